"""The C++ core under AddressSanitizer and UndefinedBehaviorSanitizer.

Builds the core once with REFIT_ENGINE_SANITIZE=ON (CPU only; incrementally in build/sanitize),
installs it into a temporary directory, and runs the planner, CPU copy, table fuzz and native
tests against it in a subprocess with the compiler's ASan and UBSan runtimes preloaded. A test
failure, a crash or any sanitizer report fails this test. About a minute for a fresh build on
2 cores (seconds when build/sanitize is up to date) plus 20-30 s of tests;
`REFIT_ENGINE_SANITIZE_TEST=0` skips it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "sanitize"
TESTS = ("test_compiler.py", "test_cpu_copy.py", "test_fuzz_tables.py", "test_native.py")
# The lines sanitizers start their reports with (ASan, LeakSanitizer, UBSan).
REPORT = re.compile(r"ERROR: (Address|Leak)Sanitizer|runtime error: |SUMMARY: \w+Sanitizer")
ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"
BUILD_TIMEOUT_S, RUN_TIMEOUT_S = 900, 600


def _compiler() -> str | None:
    """The C++ compiler CMake will pick (CXX, else c++ or g++ on PATH)."""
    for candidate in (os.environ.get("CXX"), "c++", "g++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _runtime(compiler: str, name: str) -> str | None:
    """The compiler's own copy of a runtime library (`-print-file-name`), or None: a compiler
    without it prints the bare name back."""
    try:
        out = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.realpath(out) if os.path.isabs(out) and os.path.exists(out) else None


def _runtimes() -> list[str]:
    """[libasan, libubsan] of the compiler, or skips saying what is missing."""
    if os.environ.get("REFIT_ENGINE_SANITIZE_TEST", "1") == "0":
        pytest.skip("REFIT_ENGINE_SANITIZE_TEST=0")
    if os.environ.get("REFIT_ENGINE_SANITIZED") == "1":
        pytest.skip("already running under the sanitizers")
    if not sys.platform.startswith("linux"):
        pytest.skip("sanitizer runtimes are preloaded with LD_PRELOAD: Linux only")
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler on PATH to build the sanitized core")
    libs = [_runtime(compiler, name) for name in ("libasan.so", "libubsan.so")]
    if None in libs:
        missing = [n for n, p in zip(("libasan.so", "libubsan.so"), libs) if p is None]
        pytest.skip(f"{compiler} has no {' or '.join(missing)} (install the sanitizer runtimes, "
                    f"e.g. libasan8 and libubsan1 for GCC 12)")
    probe = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True,
                           env=dict(os.environ, LD_PRELOAD=" ".join(libs),
                                    ASAN_OPTIONS=ASAN_OPTIONS), timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"the ASan runtime does not start Python here: {probe.stderr[-500:]}")
    return libs


def _build(target: Path) -> float:
    """Builds and installs the sanitized core (and the package) into `target`; seconds taken."""
    env = dict(os.environ, REFIT_ENGINE_CUDA="OFF",
               CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--no-build-isolation", "--no-deps", "--target", str(target),
           "-C", f"build-dir={BUILD_DIR}", "-C", "cmake.build-type=RelWithDebInfo",
           "-C", "cmake.define.REFIT_ENGINE_SANITIZE=ON",
           "-C", "cmake.define.REFIT_ENGINE_CUDA=OFF", str(ROOT)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"sanitized build failed ({' '.join(cmd)}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}", pytrace=False)
    return time.monotonic() - start


# Run in the subprocess: checks that the sanitized module is the one imported, then the tests.
RUNNER = """
import os, sys
import pytest
import refit_engine
core = os.path.realpath(refit_engine._core.__file__)
if not core.startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit(f"refit_engine._core was imported from {core}, not the sanitized build in {sys.argv[1]}")
print(f"sanitized core: {core}", flush=True)
sys.exit(pytest.main(["-q", "--capture=sys", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


@pytest.mark.slow
def test_core_under_asan_and_ubsan(tmp_path):
    libs = _runtimes()
    target = tmp_path / "sanitized"
    build_s = _build(target)
    preload = " ".join(libs + [p for p in [os.environ.get("LD_PRELOAD")] if p])
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS=ASAN_OPTIONS,
               UBSAN_OPTIONS=UBSAN_OPTIONS, REFIT_ENGINE_SANITIZED="1",
               PYTHONPATH=os.pathsep.join([str(target)] + [p for p in [
                   os.environ.get("PYTHONPATH")] if p]))
    # From the install directory, so `refit_engine` is the installed copy next to the sanitized
    # _core (the checkout's package directory is not on the path); `--capture=sys` leaves file
    # descriptor 2 alone, so a report written just before the process dies is not lost.
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(target),
                           *(str(ROOT / "tests" / t) for t in TESTS)],
                          cwd=target, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    run_s = time.monotonic() - start
    output = proc.stdout + proc.stderr
    print(f"sanitized build {build_s:.0f} s, tests {run_s:.0f} s\n{proc.stdout[-2000:]}")
    report = REPORT.search(output)
    if proc.returncode != 0 or report:
        where = output[max(0, report.start() - 2000):] if report else output
        pytest.fail(f"tests under ASan/UBSan {'reported' if report else 'failed'} "
                    f"(exit status {proc.returncode}):\n{where[-12000:]}", pytrace=False)
    assert "sanitized core: " in proc.stdout
