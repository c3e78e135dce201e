"""The CPU benchmark scripts still run (tiny sizes; results go to a temporary directory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name, args, tmp_path):
    env = dict(os.environ, REFIT_RESULTS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(BENCH / name), *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.glob("*.json")), "no raw results written"
    return json.loads(out.stdout.strip().splitlines()[-1])  # the last line: one JSON object


def test_scale_benchmark(tmp_path):
    figures = run_script("scale.py", ["--gpus", "128", "--repeats", "1"], tmp_path)
    row = figures["128"]
    assert row["rank_s"] > 0 and row["cluster_s"] > 0
    assert 1.0 <= row["busiest_over_lower_bound"] <= 1.05
    assert row["busiest_link_aware_gib"] <= row["busiest_round_robin_gib"]


def test_plan_compile_benchmark(tmp_path):
    figures = run_script("plan_compile.py", ["--configs", "8:4", "--repeats", "1", "--no-megatron"],
                         tmp_path)
    assert figures["ours_rank_s"] > 0 and figures["config"] == "TP8/EP64 -> TP4/EP128"


def _load_bench(name):
    """A benchmark script as a module (bench/ is not a package); nothing runs on import."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ipc_benchmark_command_line():
    """bench/ipc.py needs a GPU to run; its command line works everywhere: --help, the
    defaults (bench/loopback.py's sizes, 8 processes, MPS on) and refused values."""
    script = str(BENCH / "ipc.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--layers", "--experts", "--world", "--iters", "--mps", "--no-mps"):
        assert flag in out.stdout, flag
    bad = subprocess.run([sys.executable, script, "--world", "3"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "--world" in bad.stderr, bad.stderr[-2000:]
    ipc = _load_bench("ipc")
    args = ipc.parse_args([])
    assert (args.layers, args.experts, args.world, args.mps) == (4, 32, 8, True)
    assert ipc.parse_args(["--no-mps", "--world", "4"]).mps is False
    src, dst = ipc.layouts(ipc.parse_args(["--layers", "2", "--experts", "8"]))
    assert sorted(src.ranks) == sorted(dst.ranks) == list(range(8))


def test_ipc_benchmark_check_finds_exact_and_wrong():
    """bench/ipc.py's bit-exact check (values hashed from tensor name and global index,
    filled and checked per piece) on CPU tensors of the toy Kimi K2 at its layouts, refit by
    the NumPy reference executor: exact, then one wrong element found, and a different seed's
    values refused."""
    import torch

    from refit_engine.compiler import Planner
    from refit_engine.executors.reference import run_reference
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout
    ipc = _load_bench("ipc")
    ipc.BLOCK = 1000  # several blocks per piece
    cfg = KimiK2Config.toy()
    src = kimi_k2_layout(cfg, ParallelGrid(8, tp=8, ep=8))
    dst = kimi_k2_layout(cfg, ParallelGrid(8, tp=4, ep=4))

    def tensors(layout):
        return {(b.rank, b.key): torch.empty(b.shape, dtype=getattr(torch, b.dtype))
                for b in layout.buffers}

    def as_bytes(buffers):
        return {k: t.view(-1).view(torch.uint8).numpy() for k, t in buffers.items()}

    src_t, dst_t = tensors(src), tensors(dst)
    ipc.fill(src, src_t, seed=1)
    ipc.poison(dst_t)
    assert len(ipc.check(dst, dst_t, seed=1)) == len(dst_t)  # poisoned: every tensor wrong
    run_reference(Planner(src, dst, 1 << 16).plan_all(), src, dst, as_bytes(src_t),
                  as_bytes(dst_t))
    assert ipc.check(dst, dst_t, seed=1) == []
    assert ipc.check(dst, dst_t, seed=2) != []
    (rank, key), t = next(iter(dst_t.items()))
    t.view(-1).view(torch.int16)[3] += 1
    assert ipc.check(dst, dst_t, seed=1) == [f"{rank}:{key}"]


def test_ipc_benchmark_alias_compare_command_line():
    """bench/ipc.py --alias-compare (plan(alias=True) against alias=False over IPC, EP
    unchanged) parses everywhere; its layouts keep EP (every routed expert of every rank is
    aliasable) and its report says whether memory dropped by bytes_aliased on every rank."""
    from refit_engine.aliasing import aliasable_buffers
    from refit_engine.compiler import Planner
    script = str(BENCH / "ipc.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--alias-compare" in out.stdout and "--ipc-sync" in out.stdout
    ipc = _load_bench("ipc")
    assert ipc.parse_args([]).alias_compare is False
    args = ipc.parse_args(["--alias-compare", "--layers", "2", "--experts", "8"])
    assert args.alias_compare and args.ipc_sync == "device" and args.world == 8
    src, dst = ipc.alias_layouts(args)
    planner = Planner(src, dst)
    for rank in range(8):
        keys = {dst.buffers[d].key for d in aliasable_buffers(planner.plan_rank(rank), src, dst)}
        experts = {b.key for b in dst.buffers if b.rank == rank and ".experts." in b.key}
        assert experts and experts <= keys, rank

    def rank_figures(aliased, dropped):
        def setting(on):
            local = 100 << 20
            return {"wall_ms": [2.0, 1.0, 3.0] if on else [4.0, 5.0, 6.0],
                    "event_ms": [1.0, 1.0, 1.0], "plan_s": 1.0, "transports": ["ipc"],
                    "traffic": dict.fromkeys(ipc.ALIAS_STATS, 0),
                    "stats": {**dict.fromkeys(ipc.ALIAS_STATS, 0),
                              "bytes_aliased": aliased if on else 0,
                              "bytes_local": local - aliased if on else local},
                    "aliases": 3 if on else 0, "shared": 3 if on else 0, "not_aliased": {},
                    "wrong": [], "base": 10, "models": 1000 << 20,
                    "after_plan": (1000 << 20) - (dropped if on else 0),
                    "after_refit": (1000 << 20) - (dropped if on else 0)}
        return {"device": "test", "off": setting(False), "on": setting(True)}

    args = ipc.parse_args(["--alias-compare", "--world", "2", "--experts", "2"])
    mps = ipc.Mps(False).record()
    good = ipc.merge_alias([rank_figures(64 << 20, (64 << 20) + 4096)] * 2)
    key = ipc.report_alias(args, good, mps, 1, 1)
    assert key["alias_mem_ok"] and key["alias_exact"] and key["alias_shared"], key
    assert key["alias_local_ok"] and key["staging_bytes"] == 0
    assert (key["alias_off_ms"], key["alias_on_ms"]) == (5.0, 2.0)
    assert key["bytes_aliased_gib"] == 128 / 1024
    assert key["alias_mem_drop_minus_aliased_mib"] == 2 * 4096 / 2**20
    assert good["per_rank"][0]["drop"] == (64 << 20) + 4096
    short = ipc.merge_alias([rank_figures(64 << 20, 32 << 20)] * 2)
    assert not ipc.report_alias(args, short, mps, 1, 1)["alias_mem_ok"]
