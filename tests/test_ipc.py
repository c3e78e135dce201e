"""CUDA IPC transport (issue 15): several rank processes on ONE GPU, bit-exact.

Every rank is its own process (tests/multiproc.py's run_world: gloo default group) and every
one of them puts its tensors on cuda:0, so the only transport that can join them is CUDA IPC:
`transport="auto"` must choose it for every peer, NCCL must be refused.

- toy Kimi K2 layouts (kimi_k2_layout + from_layout, as tests/test_nccl_multi.py): TP, EP
  (experts move, per-expert and grouped expert tensors), ETP and PP changes, collocated and
  in separate processes (source ranks 0..h-1, destination ranks h..2h-1, one GPU), with
  ipc_sync "host" and "device"; each plan runs plain, plain with sync=False, captured as a
  CUDA graph and replayed (new source values written in place before every run, destination
  poisoned with 0xA5 before every run), checked bit for bit against materialize(dst, globals);
- the toy Kimi K2 built with megatron-core on cuda:0 in every rank process: a TP and an EP
  change through refit_engine.plan / execute, checked with verify.check_exact;
- faults: a peer that dies after plan() (the others raise RefitError within the timeout, with
  and without execute's host check); a source tensor replaced / freed after planning (refused
  on every rank before any byte moves, every destination still poisoned); transport="nccl"
  with the ranks sharing one GPU (refused on every rank, naming the GPU); the caching
  allocator's expandable segments (planning works, or is refused naming a tensor).

NOTE on ordering: a source rank writes the next run's source values into its tensors right
after its own execute() returns (or after torch.cuda.synchronize() for sync=False), with no
barrier: the transport must not let a peer read those tensors after the source rank's refit
is complete on its stream (as NCCL's send completes only once the buffer may be reused).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpu_check
from multiproc import run_world

import refit_engine

POISON = 0xA5
DEAD_TIMEOUT_S = 15.0  # the plans' timeout_s in the dead-peer tests


pytestmark = gpu_check.MARKS


# -- helpers (run in the rank processes) ------------------------------------------------------

def _layouts(src_grid: dict, dst_grid: dict, world: int, separate: bool, grouped: bool = False):
    """Toy Kimi K2 source and destination layouts on `world` ranks: both on all of them, or
    (separate) the source on ranks 0..h-1 and the destination on h..2h-1."""
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout
    cfg = KimiK2Config.toy()
    half = world // 2 if separate else world
    src = kimi_k2_layout(cfg, ParallelGrid(half, **src_grid), grouped_experts=grouped)
    dst = kimi_k2_layout(cfg, ParallelGrid(half, offset=half if separate else 0, **dst_grid),
                         grouped_experts=grouped)
    return src, dst


def _on_gpu(buffers: dict) -> dict:
    """materialize()'s {(rank, key): array} as {key: tensor on cuda:0}."""
    return {k[1]: torch.from_numpy(np.ascontiguousarray(v)).to("cuda:0")
            for k, v in buffers.items()}


def _write_in_place(tensors: dict, buffers: dict) -> None:
    """New values into the bound tensors themselves (their memory stays where it is)."""
    for (_, key), value in buffers.items():
        tensors[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def _poison(tensors: dict) -> None:
    for t in tensors.values():
        t.view(torch.uint8).fill_(POISON)


def _wrong(tensors: dict, want: dict) -> list[str]:
    """Keys of `tensors` whose bits differ from `want` ({(rank, key): array})."""
    return [key for (_, key), value in want.items()
            if not np.array_equal(tensors[key].cpu().numpy(), value)]


def _still_poisoned(tensors: dict) -> bool:
    return all(bool((t.view(torch.uint8) == POISON).all()) for t in tensors.values())


def _models(rank, src, dst, values, transport="auto", ipc_sync="host", timeout_s=60.0):
    """This rank's tensors of both sides (sources from `values`, destinations poisoned) and the
    plan over them."""
    from refit_engine.executors.reference import materialize
    from refit_engine.local import from_layout
    mine = {rank}
    src_t = _on_gpu(materialize(src, values, ranks=mine))
    dst_t = _on_gpu(materialize(dst, poison=POISON, ranks=mine))
    src_local = from_layout(src, rank, src_t) if src_t else None
    dst_local = from_layout(dst, rank, dst_t) if dst_t else None
    plan = refit_engine.plan(src_local, dst_local, bucket_bytes=1 << 16, timeout_s=timeout_s,
                             transport=transport, ipc_sync=ipc_sync)
    return src_t, dst_t, src_local, dst_local, plan


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# Each plan's runs: (label, graph, sync). New source values before each, destination poisoned.
STEPS = [("plain", False, True), ("plain sync=False", False, False),
         ("graph capture", True, True), ("graph replay", True, True),
         ("graph replay sync=False", True, False), ("plain after graph", False, True)]


def _run_case(rank, src, dst, ipc_sync, seed, transport="auto") -> dict:
    """One layout pair on this rank: plan, then every step of STEPS, each checked bit for bit.
    Returns {"transports", "traffic", "stats", "steps": {label: [] or wrong keys or error}}."""
    import torch.distributed as dist

    from refit_engine.executors.reference import materialize, random_globals
    rng = np.random.default_rng(seed)
    values = random_globals(src, rng)
    mine = {rank}
    try:
        src_t, dst_t, _, _, plan = _models(rank, src, dst, values, transport, ipc_sync)
    except Exception as exc:  # noqa: BLE001 - reported per case (raised on every rank alike)
        return {"plan": _error_text(exc)}
    out = {"transports": sorted(set(plan.peer_transports.values())),
           "peers": sorted(plan.peer_transports),
           "traffic": {k: plan.traffic.get(k) for k in
                       ("bytes_local", "bytes_sent", "bytes_received", "bytes_ipc",
                        "staging_bytes")},
           "steps": {}}
    for i, (label, graph, sync) in enumerate(STEPS):
        if i:  # new source values, in place, right after the previous run (NOTE above)
            values = random_globals(src, rng)
            _write_in_place(src_t, materialize(src, values, ranks=mine))
        _poison(dst_t)
        try:
            stats = refit_engine.execute(plan, graph=graph, sync=sync)
            if not sync:
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a refit error is raised on every rank
            out["steps"][label] = _error_text(exc)
            break
        if i == 0:
            out["stats"] = {k: stats.get(k) for k in ("bytes_ipc", "staging_bytes",
                                                     "bytes_received")}
        out["steps"][label] = _wrong(dst_t, materialize(dst, values, poison=POISON, ranks=mine))
    plan.close()
    # Every rank's plan closed (its mappings of the peers' tensors released) before any rank
    # drops the tensors of this case.
    dist.barrier()
    return out


def _refit_cases(rank, world, cases, syncs):
    torch.cuda.set_device(0)
    out = {}
    for sync in syncs:
        for i, (name, s, d, separate, grouped) in enumerate(cases):
            src, dst = _layouts(s, d, world, separate, grouped)
            out[f"{name} [ipc_sync={sync}]"] = _run_case(rank, src, dst, sync, seed=100 + i)
    return out


def _check_cases(results: list[dict]) -> None:
    """Every rank's every case: planned over IPC only, every step bit-exact, no staging, and
    what came from peers came over IPC."""
    names = results[0].keys()
    for name in names:
        per_rank = [r[name] for r in results]
        for rank, res in enumerate(per_rank):
            where = f"rank {rank}, {name}"
            assert "plan" not in res, f"{where}: plan() failed: {res['plan']}"
            assert set(res["transports"]) <= {"ipc"}, f"{where}: transports {res['transports']}"
            assert len(res["steps"]) == len(STEPS), f"{where}: stopped: {res['steps']}"
            bad = {k: v for k, v in res["steps"].items() if v != []}
            assert not bad, f"{where}: wrong or failed steps {bad}"
            traffic = res["traffic"]
            assert traffic["staging_bytes"] == 0, f"{where}: staging {traffic}"
            assert traffic["bytes_ipc"] == traffic["bytes_received"], f"{where}: {traffic}"
            assert res["stats"]["staging_bytes"] == 0, f"{where}: stats {res['stats']}"
            assert res["stats"]["bytes_ipc"] == traffic["bytes_ipc"], f"{where}: {res['stats']}"
            if traffic["bytes_received"]:
                assert res["peers"], f"{where}: bytes from peers but no peer transports"
        if "separate" in name:  # every destination byte crossed processes
            assert sum(r["traffic"]["bytes_ipc"] for r in per_rank) > 0, name
    assert any(r[n]["traffic"]["bytes_ipc"] for r in results for n in names), \
        "no case moved a byte over IPC"


# (name, source grid, destination grid, separate processes, grouped expert tensors)
CASES_4 = [
    ("TP2->TP1", dict(tp=2), dict(tp=1), False, False),
    ("TP1->TP2", dict(tp=1), dict(tp=2), False, False),
    ("TP2/EP2->TP1/EP4 experts move", dict(tp=2, ep=2), dict(tp=1, ep=4), False, False),
    ("EP2->EP4 grouped experts", dict(tp=1, ep=2), dict(tp=1, ep=4), False, True),
    ("ETP2->ETP1", dict(tp=2, ep=2, etp=2), dict(tp=2, ep=2, etp=1), False, False),
    ("PP2->PP1", dict(tp=2, pp=2), dict(tp=2), False, False),
    ("separate TP2/EP2 on 0-1 -> TP1/EP2 on 2-3", dict(tp=2, ep=2), dict(tp=1, ep=2), True,
     False),
    ("separate PP2 on 0-1 -> TP2 on 2-3", dict(pp=2), dict(tp=2), True, False),
]

CASES_8 = [
    ("TP8/EP8->TP4/EP4 (the benchmark's layouts)", dict(tp=8, ep=8), dict(tp=4, ep=4), False,
     False),
    ("TP2/PP2/EP2->TP4/EP8", dict(tp=2, pp=2, ep=2), dict(tp=4, ep=8), False, False),
    ("separate TP4/EP4 on 0-3 -> TP2/EP2 on 4-7", dict(tp=4, ep=4), dict(tp=2, ep=2), True,
     False),
]


@pytest.mark.parametrize("ipc_sync", ["host", "device"])
def test_toy_kimi_k2_layouts_over_ipc_bit_exact(ipc_sync):
    """4 processes on cuda:0: every layout change, plain and graph, bit-exact over IPC."""
    _check_cases(run_world(_refit_cases, 4, CASES_4, [ipc_sync], timeout=240))


def test_eight_processes_on_one_gpu_bit_exact():
    """8 processes on cuda:0, both ipc_sync modes: the benchmark's TP8/EP8 -> TP4/EP4 at toy
    size, a PP+EP change, and separate halves."""
    _check_cases(run_world(_refit_cases, 8, CASES_8, ["host", "device"], timeout=300))


# -- megatron-core models on cuda:0 ------------------------------------------------------------

def _have_megatron() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):
        return False


def _megatron_worker(rank, world):
    import warnings

    import torch.distributed as dist
    from megatron_check import poison

    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.main_job import place_on
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.verify import check_exact
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.cuda.set_device(0)
    cfg = KimiK2Config.toy(num_layers=4, num_experts=8)
    cases = [("TP2->TP1", dict(tp=2), dict(tp=1)),
             ("TP2/EP2->TP1/EP4 experts move", dict(tp=2, ep=2), dict(tp=1, ep=4)),
             ("TP2/ETP2->TP2/EP2/ETP1", dict(tp=2, etp=2), dict(tp=2, ep=2, etp=1)),
             ("TP2/PP2->TP4", dict(tp=2, pp=2), dict(tp=4))]
    report = {}
    for name, s, d in cases:
        sg, dg = ParallelGrid(world, **s), ParallelGrid(world, **d)
        spg, dpg = build_process_groups(sg), build_process_groups(dg)
        src = build_kimi_k2(cfg, sg, spg, device="cuda:0", seed=11)
        dst = build_kimi_k2(cfg, dg, dpg, device="cuda:0", seed=22)
        for chunks in (src, dst):  # megatron leaves some buffers elsewhere: all on cuda:0
            place_on(chunks, "cuda:0")
        for sync in ("host", "device"):
            entry = {}
            poison(dst)
            plan = refit_engine.plan(src, dst, timeout_s=60, transport="auto", ipc_sync=sync)
            entry["transports"] = sorted(set(plan.peer_transports.values()))
            entry["staging_bytes"] = plan.traffic.get("staging_bytes")
            refit_engine.execute(plan)
            entry["plain_wrong"] = check_exact(plan)
            poison(dst)
            refit_engine.execute(plan, graph=True)
            entry["graph_wrong"] = check_exact(plan)
            entry["tensors"] = len(plan.dst_tensors)
            entry["bytes_ipc"] = plan.traffic.get("bytes_ipc")
            plan.close()
            dist.barrier()
            report[f"{name} [ipc_sync={sync}]"] = entry
    return report


@pytest.mark.skipif(not _have_megatron(), reason="needs megatron-core")
def test_megatron_models_on_one_gpu_bit_exact():
    """megatron-core's toy Kimi K2 on cuda:0 in each of 4 processes: TP, EP, ETP and PP
    changes."""
    reports = run_world(_megatron_worker, 4, timeout=300)
    for rank, report in enumerate(reports):
        for name, e in report.items():
            assert set(e["transports"]) <= {"ipc"}, (rank, name, e["transports"])
            assert e["staging_bytes"] == 0, (rank, name, e)
            assert e["plain_wrong"] == [], (rank, name, e["plain_wrong"][:5])
            assert e["graph_wrong"] == [], (rank, name, e["graph_wrong"][:5])
            assert e["tensors"] > 0, (rank, name)
    assert all(sum(r[n]["bytes_ipc"] for r in reports) > 0 for n in reports[0]), \
        "a megatron case moved nothing over IPC"


# -- faults ------------------------------------------------------------------------------------

def _dead_peer(rank, world, ipc_sync, check):
    """TP4 -> TP1: every rank reads from every other. The last rank dies after plan()."""
    from refit_engine import RefitError
    from refit_engine.executors.reference import random_globals
    torch.cuda.set_device(0)
    src, dst = _layouts(dict(tp=4), dict(tp=1), world, False)
    values = random_globals(src, np.random.default_rng(3))
    *_, plan = _models(rank, src, dst, values, ipc_sync=ipc_sync, timeout_s=DEAD_TIMEOUT_S)
    if rank == world - 1:
        os._exit(7)  # dies before execute(): its peers must not wait on it past the timeout
    t0 = time.perf_counter()
    try:
        refit_engine.execute(plan, check=check)
        raised = None
    except RefitError as exc:
        raised = _error_text(exc)
    except Exception as exc:  # noqa: BLE001 - not a RefitError: the test reports it
        raised = f"not a RefitError: {_error_text(exc)}"
    elapsed = time.perf_counter() - t0
    # The process (its CUDA context) is still usable afterwards: no sticky error.
    try:
        torch.cuda.synchronize()
        cuda_ok = bool((torch.ones(4, device="cuda:0") * 2).sum().item() == 8)
    except Exception as exc:  # noqa: BLE001
        cuda_ok = _error_text(exc)
    return raised, elapsed, cuda_ok, plan.broken is not None


@pytest.mark.parametrize("ipc_sync,check", [("host", True), ("host", False), ("device", False)],
                         ids=["host-checked", "host-unchecked", "device-unchecked"])
def test_dead_peer_raises_within_timeout(ipc_sync, check):
    """check=False goes straight to the transport (no host check before the refit)."""
    world = 4
    results = run_world(_dead_peer, world, ipc_sync, check, dying={world - 1}, timeout=120)
    for rank, (raised, elapsed, cuda_ok, broken) in enumerate(results[:-1]):
        assert raised is not None, f"rank {rank}: execute() returned with a dead peer"
        assert not raised.startswith("not a RefitError"), f"rank {rank}: {raised}"
        assert elapsed < DEAD_TIMEOUT_S + 15, f"rank {rank}: {elapsed:.1f} s: {raised}"
        assert cuda_ok is True, f"rank {rank}: CUDA unusable after the failure: {cuda_ok}"
        assert broken, f"rank {rank}: the failed plan does not report itself unusable"


REPLACED_KEY = "decoder.layers.0.self_attention.linear_q_up_proj.weight"  # TP-split: read by all
# (how rank 1's source tensor changes after plan(), graph, ipc_sync)
MUTATIONS = [("data", False, "host"), ("set_", False, "host"), ("dict", False, "host"),
             ("freed", False, "host"), ("data", True, "host"), ("data", True, "device"),
             ("set_", False, "device")]


def _replaced_source(rank, world):
    import torch.distributed as dist

    from refit_engine import RefitError
    from refit_engine.executors.reference import materialize, random_globals
    torch.cuda.set_device(0)
    src, dst = _layouts(dict(tp=4), dict(tp=1), world, False)
    out = {}
    for i, (how, graph, sync) in enumerate(MUTATIONS):
        values = random_globals(src, np.random.default_rng(i))
        src_t, dst_t, src_local, _, plan = _models(rank, src, dst, values, ipc_sync=sync,
                                                   timeout_s=30)
        refit_engine.execute(plan, graph=graph)  # one good refit: the peers' mappings in use
        good = _wrong(dst_t, materialize(dst, values, ranks={rank}))
        torch.cuda.synchronize()
        dist.barrier()
        _poison(dst_t)
        if rank == 1:
            t = src_t[REPLACED_KEY]
            fresh = t.clone()  # other memory (the values do not matter: refused anyway)
            if how == "data":
                t.data = fresh
            elif how == "set_":
                t.set_(fresh)
            elif how == "dict":
                src_local.tensors[REPLACED_KEY] = fresh
            elif how == "freed":
                t.untyped_storage().resize_(0)
        try:
            refit_engine.execute(plan, graph=graph)
            raised = None
        except RefitError as exc:
            raised = (exc.tensor, exc.ranks, exc.reason)
        torch.cuda.synchronize()
        out[f"{how} graph={graph} ipc_sync={sync}"] = {
            "good": good, "raised": raised, "untouched": _still_poisoned(dst_t)}
        plan.close()
        dist.barrier()
    return out


def test_source_replaced_after_planning_caught_before_any_byte_moves():
    results = run_world(_replaced_source, 4, timeout=240)
    for name in results[0]:
        raised = {rank: r[name]["raised"] for rank, r in enumerate(results)}
        for rank, r in enumerate(results):
            e = r[name]
            assert e["good"] == [], f"rank {rank}, {name}: the good refit was wrong: {e['good']}"
            assert e["raised"] is not None, f"rank {rank}, {name}: execute() did not raise"
            tensor, ranks, reason = e["raised"]
            assert tensor == REPLACED_KEY and ranks == [1], (rank, name, e["raised"])
            assert "after planning" in reason, (rank, name, reason)
            assert e["untouched"], f"rank {rank}, {name}: destination written"
        assert len({tuple(map(str, v)) for v in raised.values()}) == 1, (name, raised)


def _gpu_names() -> list[str]:
    """The ways an error may name cuda:0: its index, UUID, PCI bus id."""
    props = torch.cuda.get_device_properties(0)
    names = ["cuda:0", "GPU 0", "gpu 0", "device 0"]
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        names += [str(uuid), f"GPU-{uuid}"]
    bus, dev, dom = (getattr(props, f"pci_{k}_id", None) for k in ("bus", "device", "domain"))
    if bus is not None and dev is not None:
        names += [f"{bus:02x}:{dev:02x}", f"{bus:02X}:{dev:02X}"]
        if dom is not None:
            names += [f"{dom:04x}:{bus:02x}:{dev:02x}", f"{dom:08x}:{bus:02x}:{dev:02x}"]
    return names


def _nccl_refused(rank, world):
    from refit_engine import RefitError
    from refit_engine.executors.reference import materialize, random_globals
    torch.cuda.set_device(0)
    src, dst = _layouts(dict(tp=2), dict(tp=1), world, False)
    out = {}
    for label, kw in (("nccl", {"transport": "nccl"}), ("bad transport", {"transport": "tcp"}),
                      ("bad ipc_sync", {"ipc_sync": "spin"})):
        values = random_globals(src, np.random.default_rng(1))
        try:
            _models(rank, src, dst, values, **kw)
            out[label] = None
        except RefitError as exc:
            text = str(exc)
            out[label] = {"text": text, "ranks": exc.ranks,
                          "names_gpu": any(n.lower() in text.lower() for n in _gpu_names())}
    # Refusals never poison the caller's group: an explicit transport="ipc" plan works next.
    values = random_globals(src, np.random.default_rng(2))
    _, dst_t, _, _, plan = _models(rank, src, dst, values, transport="ipc")
    refit_engine.execute(plan)
    out["ipc after"] = {"wrong": _wrong(dst_t, materialize(dst, values, ranks={rank})),
                        "transports": sorted(set(plan.peer_transports.values()))}
    plan.close()
    return out


def test_nccl_refused_with_ranks_sharing_a_gpu():
    results = run_world(_nccl_refused, 4, timeout=180)
    for label in ("nccl", "bad transport", "bad ipc_sync"):
        texts = {r[label]["text"] if r[label] else None for r in results}
        assert None not in texts, f"{label}: planned on some rank: {results}"
        assert len(texts) == 1, f"{label}: ranks raised different errors: {texts}"
    for rank, r in enumerate(results):
        assert r["nccl"]["names_gpu"], f"rank {rank}: the error does not name the GPU: {r['nccl']}"
        assert r["ipc after"]["wrong"] == [], (rank, r["ipc after"])
        assert set(r["ipc after"]["transports"]) <= {"ipc"}, (rank, r["ipc after"])


def _expandable(rank, world):
    import torch.distributed as dist

    from refit_engine import RefitError
    from refit_engine.executors.reference import materialize, random_globals
    torch.cuda.set_device(0)
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    src, dst = _layouts(dict(tp=2, ep=2), dict(tp=1, ep=4), world, False)
    values = random_globals(src, np.random.default_rng(4))
    try:
        _, dst_t, _, _, plan = _models(rank, src, dst, values)
    except RefitError as exc:
        outcome = {"refused": (exc.tensor, exc.ranks, exc.reason)}
    else:
        refit_engine.execute(plan)
        outcome = {"planned": _wrong(dst_t, materialize(dst, values, ranks={rank})),
                   "transports": sorted(set(plan.peer_transports.values()))}
        plan.close()
    dist.barrier()
    segments = torch.cuda.memory._snapshot().get("segments", [])
    outcome["conf"] = conf
    outcome["expandable_segments_seen"] = any(s.get("is_expandable") for s in segments)
    return outcome


def test_expandable_segments_plan_or_refuse_naming_a_tensor():
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the rank processes from the start
    (before CUDA is initialized there): the tensors live in cuMem-mapped segments, which
    cudaIpcGetMemHandle cannot export. Planning either works (and refits bit-exactly) or is
    refused with a RefitError naming a tensor, on every rank; never a crash."""
    from multiproc import _gloo_rank

    from refit_engine.harness.spawn import failure_report, run_ranks
    values, failures = run_ranks(_gloo_rank, 4, _expandable, (), timeout=180,
                                 env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert not failures, failure_report(failures)
    results = [values[r] for r in range(4)]
    assert all(r["conf"] == "expandable_segments:True" for r in results), results
    kinds = {"refused" if "refused" in r else "planned" for r in results}
    assert len(kinds) == 1, f"some ranks planned, others refused: {results}"
    if kinds == {"refused"}:
        errors = {tuple(map(str, r["refused"])) for r in results}
        assert len(errors) == 1, f"ranks refused differently: {errors}"
        tensor = results[0]["refused"][0]
        assert tensor and tensor != "*", f"the refusal names no tensor: {results[0]['refused']}"
    else:
        for rank, r in enumerate(results):
            assert r["planned"] == [], (rank, r)
            assert set(r["transports"]) <= {"ipc"}, (rank, r)


# -- plan(alias=True) over IPC (issue 17) ------------------------------------------------------

ALIAS_SLACK_BYTES = 64 << 10  # per rank: what the memory drop may fall short of bytes_aliased


def _aliased_over_ipc(rank, world, ipc_sync):
    """TP4/EP4 -> TP2/EP4 (EP and expert TP unchanged) on cuda:0, alias=False then alias=True,
    each over models built fresh (the previous ones freed first): bit-exact with poisoned
    destinations, aliases sharing the source's memory, memory_allocated() after planning,
    and new source values written in place (a training update) seen after execute."""
    import gc

    import torch.distributed as dist

    from refit_engine.executors.reference import materialize, random_globals
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout
    from refit_engine.local import from_layout
    torch.cuda.set_device(0)
    # Larger routed experts than the toy's (512 KiB each), so the aliased bytes dwarf the
    # allocator's rounding and the slack.
    cfg = KimiK2Config.toy(moe_ffn=2048)
    src = kimi_k2_layout(cfg, ParallelGrid(world, tp=world, ep=world))
    dst = kimi_k2_layout(cfg, ParallelGrid(world, tp=world // 2, ep=world))
    mine = {rank}
    out = {}
    for alias in (False, True):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        rng = np.random.default_rng(50 + int(alias))
        values = random_globals(src, rng)
        src_t = _on_gpu(materialize(src, values, ranks=mine))
        dst_t = _on_gpu(materialize(dst, poison=POISON, ranks=mine))
        before = {k: t.data_ptr() for k, t in dst_t.items()}
        plan = refit_engine.plan(from_layout(src, rank, src_t), from_layout(dst, rank, dst_t),
                                 bucket_bytes=1 << 16, timeout_s=60, transport="auto",
                                 ipc_sync=ipc_sync, alias=alias, name=f"alias-{alias}")
        torch.cuda.synchronize()
        entry = {"planned_bytes": torch.cuda.memory_allocated() - base,
                 "transports": sorted(set(plan.peer_transports.values())),
                 "aliased": sorted(a.key for a in plan.aliases),
                 "alias_nbytes": sum(a.nbytes for a in plan.aliases),
                 "traffic_aliased": plan.traffic["bytes_aliased"],
                 "staging_bytes": plan.traffic["staging_bytes"]}
        entry["shared"] = sorted(a.key for a in plan.aliases
                                 if dst_t[a.key].data_ptr() == src_t[a.source_key].data_ptr()
                                 != before[a.key])
        stats = refit_engine.execute(plan)
        entry["stats"] = {k: stats.get(k) for k in ("bytes_aliased", "bytes_local", "bytes_ipc",
                                                    "staging_bytes")}
        entry["first"] = _wrong(dst_t, materialize(dst, values, poison=POISON, ranks=mine))
        # A training update in place on the sources, right after the refit (NOTE at the top).
        # The aliased destinations are the sources' memory: only the others are poisoned.
        values = random_globals(src, rng)
        _write_in_place(src_t, materialize(src, values, ranks=mine))
        _poison({k: t for k, t in dst_t.items() if k not in set(entry["aliased"])})
        refit_engine.execute(plan)
        entry["updated"] = _wrong(dst_t, materialize(dst, values, ranks=mine))
        entry["aliased_see_update"] = [k for k in entry["aliased"]
                                       if torch.equal(dst_t[k], src_t[k])]
        plan.close()
        torch.cuda.synchronize()
        dist.barrier()  # every rank's mappings of this rank's tensors released before freeing
        out[alias] = entry
        del plan, src_t, dst_t
    return out


@pytest.mark.parametrize("ipc_sync", ["device", "host"])
def test_alias_over_ipc_shares_storage_and_releases_memory(ipc_sync):
    """4 processes on cuda:0, EP unchanged: alias=True is bit-exact (poisoned destinations),
    aliases every routed expert into the source's memory, and memory_allocated() after
    planning is lower than with alias=False by at least bytes_aliased (less the slack)."""
    results = run_world(_aliased_over_ipc, 4, ipc_sync, timeout=180)
    for rank, r in enumerate(results):
        off, on = r[False], r[True]
        for label, e in (("off", off), ("on", on)):
            where = f"rank {rank}, alias {label}"
            assert set(e["transports"]) <= {"ipc"}, f"{where}: transports {e['transports']}"
            assert e["staging_bytes"] == 0 and e["stats"]["staging_bytes"] == 0, (where, e)
            assert e["first"] == [], f"{where}: wrong after the first refit: {e['first'][:5]}"
            assert e["updated"] == [], f"{where}: wrong after an update: {e['updated'][:5]}"
        assert off["aliased"] == [] and off["stats"]["bytes_aliased"] == 0, (rank, off)
        assert any(".experts." in k for k in on["aliased"]), (rank, on["aliased"])
        aliased = on["stats"]["bytes_aliased"]
        assert aliased > 0 and aliased == on["alias_nbytes"] == on["traffic_aliased"], (rank, on)
        assert on["shared"] == on["aliased"], (rank, on["shared"], on["aliased"])
        assert on["aliased_see_update"] == on["aliased"], (rank, on["aliased_see_update"])
        assert on["stats"]["bytes_local"] == off["stats"]["bytes_local"] - aliased, (rank, on)
        drop = off["planned_bytes"] - on["planned_bytes"]
        assert drop >= aliased - ALIAS_SLACK_BYTES, \
            f"rank {rank}: memory dropped by {drop} bytes, bytes_aliased {aliased}"
    assert sum(r[True]["stats"]["bytes_ipc"] for r in results) > 0, "nothing moved over IPC"
