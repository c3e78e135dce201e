// The one error type of the planner. The bindings turn it into refit_engine.RefitError,
// keeping the tensor name, the ranks involved and the reason as separate fields.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace refit {

class PlanError : public std::runtime_error {
   public:
    PlanError(std::string tensor, std::vector<int64_t> ranks, std::string reason)
        : std::runtime_error(format(tensor, ranks, reason)),
          tensor_(std::move(tensor)),
          ranks_(std::move(ranks)),
          reason_(std::move(reason)) {}

    const std::string& tensor() const { return tensor_; }
    const std::vector<int64_t>& ranks() const { return ranks_; }
    const std::string& reason() const { return reason_; }

   private:
    static std::string format(const std::string& tensor, const std::vector<int64_t>& ranks,
                              const std::string& reason) {
        std::ostringstream out;
        out << "tensor '" << tensor << "' (ranks [";
        for (size_t i = 0; i < ranks.size(); ++i) out << (i ? ", " : "") << ranks[i];
        out << "]): " << reason;
        return out.str();
    }

    std::string tensor_;
    std::vector<int64_t> ranks_;
    std::string reason_;
};

}  // namespace refit
