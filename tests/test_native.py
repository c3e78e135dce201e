"""The compiled core as built: loads, and links the shared C++ runtime."""

import shutil
import subprocess
import sys

import pytest

import refit_engine
from refit_engine import RefitError, Planner

from refit_check import dense


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs readelf on Linux")
def test_core_links_the_shared_cpp_runtime():
    # A statically linked libstdc++ beside torch's shared one crashed the first PlanError
    # (std::locale shared between two runtimes): the toolchain must not choose the archive.
    path = refit_engine._core.__file__
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    if "libc++" in dynamic:
        pytest.skip("built against libc++")
    assert "libstdc++.so" in dynamic, f"{path} does not link libstdc++ dynamically:\n{dynamic}"


def test_plan_errors_format_their_ranks():
    # The PlanError that segfaulted on the GPU machine: formats its rank list in C++.
    src = dense(2, 2)
    dst = dense(2, 2)
    dst.place("extra", (4,), "float32", [(0, 0)])
    with pytest.raises(RefitError, match=r"ranks \[0\]"):
        Planner(src, dst)
