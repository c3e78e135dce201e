// A tiny test harness for the plan stages' C++ tests (no framework): CHECK and CHECK_EQ report
// file, line and values and count failures; CHECK_PLAN_ERROR expects a PlanError whose reason
// contains a text. main() returns report(), nonzero on any failure.
#pragma once

#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>

#include "plan/error.h"

namespace refit_test {

inline int& failures() {
    static int count = 0;
    return count;
}

inline void fail(const char* file, int line, const std::string& what) {
    ++failures();
    std::cerr << file << ":" << line << ": FAILED: " << what << "\n";
}

inline int report(const char* name) {
    if (failures()) {
        std::cerr << name << ": " << failures() << " check(s) failed\n";
        return 1;
    }
    std::cout << name << ": all checks passed\n";
    return 0;
}

}  // namespace refit_test

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) ::refit_test::fail(__FILE__, __LINE__, #cond);           \
    } while (0)

#define CHECK_EQ(a, b)                                                                     \
    do {                                                                                   \
        const auto refit_a_ = (a);                                                         \
        const auto refit_b_ = (b);                                                         \
        if (!(refit_a_ == refit_b_)) {                                                     \
            std::ostringstream refit_out_;                                                 \
            refit_out_ << #a << " == " << #b << " (" << refit_a_ << " vs " << refit_b_ << ")"; \
            ::refit_test::fail(__FILE__, __LINE__, refit_out_.str());                      \
        }                                                                                  \
    } while (0)

// Runs `stmt`, which must throw refit::PlanError with `text` in its reason.
#define CHECK_PLAN_ERROR(stmt, text)                                                        \
    do {                                                                                    \
        bool refit_thrown_ = false;                                                         \
        try {                                                                               \
            stmt;                                                                           \
        } catch (const ::refit::PlanError& e) {                                             \
            refit_thrown_ = true;                                                           \
            if (e.reason().find(text) == std::string::npos) {                               \
                ::refit_test::fail(__FILE__, __LINE__,                                      \
                                   std::string("reason '") + e.reason() + "' lacks '" + text + "'"); \
            }                                                                               \
        }                                                                                   \
        if (!refit_thrown_) ::refit_test::fail(__FILE__, __LINE__, #stmt " did not throw PlanError"); \
    } while (0)
