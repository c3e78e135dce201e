"""The plan compiler's stages (csrc/plan/validate, replicas, buckets, assemble), each tested
alone in C++ (tests/cpp/test_<stage>.cpp, built here with plain g++ against csrc/plan), and the
table schemas the core exports by name."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CPP_TESTS = ROOT / "tests" / "cpp"
STAGES = ["validate", "replicas", "buckets", "assemble"]
GXX = shutil.which("g++")
FLAGS = ["-std=c++17", "-O1", f"-I{CSRC}"]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}",
                    pytrace=False)


@pytest.fixture(scope="module")
def plan_objects(tmp_path_factory) -> list[Path]:
    """csrc/plan/*.cpp compiled once, for every stage test to link."""
    if GXX is None:
        pytest.skip("no g++ on PATH")
    out = tmp_path_factory.mktemp("plan_objects")
    objects = []
    for source in sorted((CSRC / "plan").glob("*.cpp")):
        obj = out / (source.stem + ".o")
        _run([GXX, *FLAGS, "-c", str(source), "-o", str(obj)], f"compiling {source.name}")
        objects.append(obj)
    return objects


@pytest.mark.parametrize("stage", STAGES)
def test_stage(stage, plan_objects, tmp_path):
    binary = tmp_path / f"test_{stage}"
    _run([GXX, *FLAGS, "-Wall", str(CPP_TESTS / f"test_{stage}.cpp"), *map(str, plan_objects),
          "-o", str(binary)], f"building tests/cpp/test_{stage}.cpp")
    _run([str(binary)], f"tests/cpp/test_{stage}")


def test_every_stage_has_a_test():
    stage_sources = {p.stem for p in (CSRC / "plan").glob("*.cpp")} - {"planner", "geometry"}
    assert stage_sources == set(STAGES)
    assert all((CPP_TESTS / f"test_{s}.cpp").is_file() for s in STAGES)


def _core():
    from refit_engine import _core
    return _core


def test_exported_schemas():
    core = _core()
    dims = core.MAX_DIMS

    def per_dim(name):
        return tuple(f"{name}.{d}" for d in range(dims))

    assert core.TENSOR_FIELDS == ("ndim", "itemsize", "dtype_code") + per_dim("shape")
    assert core.TENSOR_FIELDS[:3] == ("ndim", "itemsize", "dtype_code")
    assert core.BUFFER_FIELDS == ("rank", "numel", "itemsize")
    assert core.PIECE_FIELDS == (("tensor", "holders_first", "holders_count", "local_offset")
                                 + per_dim("start") + per_dim("extent") + per_dim("stride"))
    assert len(core.TENSOR_FIELDS) == 3 + dims
    assert len(core.PIECE_FIELDS) == 4 + 3 * dims
    assert len(core.SEGMENT_FIELDS) == 11 and len(core.MESSAGE_FIELDS) == 4
    for fields in (core.TENSOR_FIELDS, core.BUFFER_FIELDS, core.PIECE_FIELDS,
                   core.SEGMENT_FIELDS, core.MESSAGE_FIELDS):
        assert len(set(fields)) == len(fields)


def test_tables_built_by_name_plan():
    """Tables filled only through the exported names plan as the C++ reads them: tensor (4, 6)
    of 2-byte elements, rows split over ranks 0 and 1 on the source, columns on the
    destination."""
    core = _core()
    col = {name: {f: i for i, f in enumerate(getattr(core, name))}
           for name in ("TENSOR_FIELDS", "BUFFER_FIELDS", "PIECE_FIELDS", "SEGMENT_FIELDS",
                        "MESSAGE_FIELDS")}
    tcol, bcol, pcol = col["TENSOR_FIELDS"], col["BUFFER_FIELDS"], col["PIECE_FIELDS"]

    def side(extents, starts, strides):
        tensors = np.zeros((1, len(tcol)), np.int64)
        tensors[0, [tcol["ndim"], tcol["itemsize"], tcol["dtype_code"]]] = (2, 2, 1)
        tensors[0, [tcol["shape.0"], tcol["shape.1"]]] = (4, 6)
        buffers = np.zeros((2, len(bcol)), np.int64)
        buffers[:, bcol["rank"]] = (0, 1)
        buffers[:, bcol["numel"]] = 12
        buffers[:, bcol["itemsize"]] = 2
        pieces = np.zeros((2, len(pcol)), np.int64)
        pieces[:, pcol["holders_first"]] = (0, 1)
        pieces[:, pcol["holders_count"]] = 1
        for d in range(2):
            pieces[:, pcol[f"start.{d}"]] = [s[d] for s in starts]
            pieces[:, pcol[f"extent.{d}"]] = extents[d]
            pieces[:, pcol[f"stride.{d}"]] = strides[d]
        return ["w"], tensors, buffers, pieces, np.arange(2, dtype=np.int64)

    src = side((2, 6), [(0, 0), (2, 0)], (6, 1))
    dst = side((4, 3), [(0, 0), (0, 3)], (3, 1))
    planner = core.Planner(*src, *dst, 1 << 20)
    plan = planner.plan_rank(0)
    seg, msg = col["SEGMENT_FIELDS"], col["MESSAGE_FIELDS"]
    local = plan["local"][:, [seg["rows"], seg["row_bytes"], seg["src_pitch"]]]
    assert local.tolist() == [[2, 6, 12]]
    assert plan["send"][0, seg["src_offset"]] == 6  # column 3 of row 0
    assert plan["recv"][0, seg["dst_offset"]] == 12  # row 2 of rank 0's (4, 3) buffer
    assert plan["send_messages"][:, [msg["peer"], msg["bytes"]]].tolist() == [[1, 12]]
