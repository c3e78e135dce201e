"""Fault catalogue: every bad-input and fault case of a refit, on CPU / gloo, one row per case.

    python bench/faults.py                    # every case; last line: one JSON summary object
    python bench/faults.py --list             # case names and what each expects
    python bench/faults.py --only NAME ...    # some cases (exact names, or substrings)
    python bench/faults.py --json rows.json   # also write every row as JSON

What a case expects (column "expected"):
- "RefitError": bad input or a fault. Handled when every rank that takes part raises
  refit_engine.RefitError (naming the tensor, ranks and reason where the case says which),
  before any byte moves (destination bit-identical to its poison), within the timeout, and the
  caller's process group still works afterwards (a barrier and, for fault cases, a fresh plan).
- "refits fine": legitimate input (zero-size tensors, NumPy with verify, ...): handled when the
  destination is bit-exact and nothing raised.
- "either": a clean RefitError on every rank or a bit-exact refit are both acceptable.

Verdicts: handled; crash (a rank process died unexpectedly or by a signal); hang (the case's
hard deadline passed; its world is killed); silent_wrong (nothing raised, but the destination is
wrong or the bad input went through unnoticed and changed it); accepted (a RefitError was
expected, nothing raised, the destination is exact); failed (anything else: another exception
type, raised on some ranks only, wrong tensor / ranks / reason, too slow, group unusable after).

Every case runs on local gloo processes (2-4 ranks, or 1) started by multiprocessing, with a
hard per-case deadline. Cases that cannot break a world share one (a fresh world is started
after any case that crashed, hung or left the group out of step); the dangerous ones (memory
replaced under a plan, dead / stopped / late ranks, threads, destroyed groups) each get their
own. Worlds fork from a forkserver that has torch and refit_engine imported, so a world starts
in well under a second.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT / "tests"), str(ROOT)):  # the working tree's refit_engine first
    if _path not in sys.path:
        sys.path.insert(0, _path)

TIMEOUT_S = 1.5        # timeout_s of the cases that wait on an absent rank
SLACK_S = 2.5          # "within the timeout": timeout_s + this
LATE_S = TIMEOUT_S + 1.5  # how late a late / stopped rank is
PG_TIMEOUT_S = 120     # the worlds' own gloo timeout: far past every deadline (so: a hang)
SYNC_S = 8             # the barrier after every case
POISON = 0xA5
SHAPES = {"fc1": (48, 16), "proj": (24, 24), "norm": (16,)}  # divide by 1, 2, 3 and 4


@dataclass
class Case:
    name: str
    fn: Callable | None          # fn(rank, world, case) -> this rank's outcome (a dict)
    expect: str = "error"        # "error", "ok", "either"
    world: int = 2
    share: str | None = None     # name of a shared world; None: a world of its own
    tensor: str | None = None    # expected RefitError fields (None: not checked)
    ranks: list | None = None
    words: str | None = None
    same_error: bool = True      # the same (tensor, ranks, reason) on every rank
    dying: frozenset = frozenset()   # ranks that die on purpose (no outcome expected)
    timed: float | None = None   # RefitError within this many seconds (+ SLACK_S)
    resume_after: float | None = None  # SIGCONT a stopped rank this long after it stopped
    deadline: float = 20.0
    sync: bool = True            # barrier + name check on every rank after the case
    needs: str | None = None     # "megatron": imports megatron-core
    skip: str | None = None      # reason the case cannot run here
    note: str = ""

    @property
    def expected(self) -> str:
        if self.skip:
            return "skip"
        return {"error": "RefitError", "ok": "refits fine", "either": "either"}[self.expect]


# =============================================================================================
# Helpers run on the ranks
# =============================================================================================

def _torch():
    import torch
    return torch


def _globals(seed=0, shapes=SHAPES):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def _model(rank, tp, values, ranks, poison=None, shapes=SHAPES, dtype=None, lib="torch"):
    """TP over `ranks` (2-D tensors split on dim 0, replicas beyond tp), None off them.
    Returns (ShardedTensors or None, {key: expected local values as a torch tensor})."""
    torch = _torch()
    from refit_engine import ShardedTensors, Split
    if rank not in ranks:
        return None, {}
    part = list(ranks).index(rank) % tp
    m, want = ShardedTensors(), {}
    for name, shape in shapes.items():
        split = Split(0, tp) if tp > 1 and len(shape) == 2 else None
        full = values[name] if dtype is None else values[name].to(dtype)
        local = full.chunk(tp, 0)[part].clone().contiguous() if split else full.clone()
        want[name] = local.clone()
        if poison is not None:
            local.view(torch.uint8).fill_(poison) if local.numel() else None
        tensor = local
        if lib == "numpy":
            tensor = local.view(torch.int16).numpy().copy().view("<u2") \
                if local.dtype == torch.bfloat16 else local.numpy().copy()
        m.add(name, tensor, shape, split, part)
    return m, want


def _pair(rank, world, src_tp=None, dst_tp=1, seed=0, src_ranks=None, dst_ranks=None,
          shapes=SHAPES, lib="torch", dtype=None, values=None):
    """Source TP=src_tp (default: world) to destination TP=dst_tp, poisoned; expected values."""
    if values is not None:
        shapes = {k: tuple(v.shape) for k, v in values.items()}
    values = values if values is not None else _globals(seed, shapes)
    src_ranks = tuple(range(world)) if src_ranks is None else src_ranks
    dst_ranks = tuple(range(world)) if dst_ranks is None else dst_ranks
    src, _ = _model(rank, src_tp or len(src_ranks), values, src_ranks, shapes=shapes, lib=lib,
                    dtype=dtype)
    dst, want = _model(rank, dst_tp, values, dst_ranks, POISON, shapes=shapes, lib=lib,
                       dtype=dtype)
    return src, dst, want


def _readable(t) -> bool:
    """A strided tensor whose elements all lie inside its storage (reading a tensor whose
    storage was resized to 0 would read freed memory)."""
    torch = _torch()
    if t.is_meta or t.layout != torch.strided:
        return False
    if t.numel() == 0:
        return True
    last = t.storage_offset() + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size() <= t.untyped_storage().nbytes()


def _bits(t):
    """A copy of an array's bytes (None for what has no readable storage)."""
    import numpy as np
    torch = _torch()
    if isinstance(t, np.ndarray):
        return t.copy()
    if isinstance(t, torch.Tensor):
        if not _readable(t):
            return None
        try:
            return t.detach().clone()
        except Exception:
            return None
    return None


def _same_bits(a, b) -> bool:
    import numpy as np
    torch = _torch()
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and a.tobytes() == b.tobytes()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def _tensors_of(model) -> dict:
    """key -> array of a ShardedTensors (its quantized destinations' scale tensors as
    "<key> (scale)"), or of megatron model chunks (parameters, buffers)."""
    if model is None:
        return {}
    if hasattr(model, "tensors"):
        out = dict(model.tensors)
        out.update({f"{k} (scale)": v for k, v in getattr(model, "scales", {}).items()})
        return out
    out = {}
    for i, chunk in enumerate(model if isinstance(model, (list, tuple)) else [model]):
        for name, t in list(chunk.named_parameters()) + list(chunk.named_buffers()):
            out[f"{i}.{name}"] = t.data
    return out


def snapshot(model) -> dict:
    return {k: _bits(v) for k, v in _tensors_of(model).items()}


def untouched(model, snap) -> bool:
    now = _tensors_of(model)
    return all(_same_bits(_bits(now.get(k)), v) for k, v in snap.items())


def exact(model, want) -> bool:
    """The destination holds the expected values, bit for bit."""
    import numpy as np
    torch = _torch()
    if model is None:
        return True
    for key, value in want.items():
        got = model.tensors.get(key)
        if isinstance(got, np.ndarray):
            got = np.array(got)  # a writable copy
            got = torch.from_numpy(got.view(np.int16)).view(value.dtype) \
                if got.dtype.itemsize == 2 and value.dtype == torch.bfloat16 \
                else torch.from_numpy(got)
        if not isinstance(got, torch.Tensor) or _bits(got) is None:  # freed, meta, sparse
            return False
        if not _same_bits(got.detach().reshape(value.shape) if got.numel() == value.numel()
                          else got, value):
            return False
    return True


def error_fields(exc, step: str, t0: float) -> dict:
    from refit_engine import RefitError
    out = {"step": step, "elapsed": time.perf_counter() - t0, "error_type": type(exc).__name__}
    if isinstance(exc, RefitError):
        out.update(refit=True, tensor=exc.tensor, ranks=list(exc.ranks), reason=exc.reason)
    else:
        out.update(refit=False, reason=f"{exc}"[:300],
                   where=traceback.format_exc(limit=-3).strip().splitlines()[-3:])
    return out


def attempt(step: str, fn, *args, **kwargs):
    """(value, None) or (None, error fields) of fn(*args, **kwargs)."""
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # every kind of failure is recorded, never lost
        return None, error_fields(exc, step, t0)


def run_refit(make, plan_kw=None, exec_kw=None, after_plan=None, executes=1) -> dict:
    """The common case: make() -> (src, dst, expected); plan; after_plan(plan, src, dst,
    expected) (a mutation; may return new expected values); execute `executes` times.
    Records the first error, whether the destination still holds what it held just before the
    failing call, and whether it is exact when nothing raised."""
    import refit_engine
    made, err = attempt("setup", make)
    if err:
        return {**err, "untouched": None}
    src, dst, want = made
    snap = snapshot(dst)
    plan, err = attempt("plan", refit_engine.plan, src, dst, **(plan_kw or {}))
    if err:
        return {**err, "untouched": untouched(dst, snap)}
    if after_plan is not None:
        want = after_plan(plan, src, dst, want) or want
    out = {}
    for i in range(executes):
        snap = snapshot(dst)
        _, err = attempt("execute" if i == 0 else f"execute #{i + 1}", refit_engine.execute,
                         plan, **(exec_kw or {}))
        if err:
            return {**err, "untouched": untouched(dst, snap), "broken": bool(plan.broken)}
    out["exact"] = exact(dst, want)
    return out


def _dist():
    import torch.distributed as dist
    return dist


def _recover(rank, world, members=None, fresh_plan=True) -> tuple[bool, str]:
    """After a failure: a barrier and a fresh plan + execute (bit-exact) over `members` (None:
    the whole default group; else a new group of those ranks, created by them alone)."""
    import refit_engine
    dist = _dist()
    try:
        group = None
        if members is not None:
            if rank not in members:
                return True, ""
            group = dist.new_group(list(members), use_local_synchronization=True)
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=SYNC_S))
        if not fresh_plan:
            return True, ""
        ranks = tuple(members) if members is not None else tuple(range(world))
        src, dst, want = _pair(rank, world, src_tp=len(ranks), src_ranks=ranks, dst_ranks=ranks,
                               seed=5)
        plan = refit_engine.plan(src, dst, group=group, timeout_s=SYNC_S)
        refit_engine.execute(plan)
        if not exact(dst, want):
            return False, "fresh refit after the failure is not exact"
        return True, ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc)[:160]}"


# =============================================================================================
# The cases
# =============================================================================================

# -- the 22 of tests/test_bad_input.py ---------------------------------------------------------

def _matrix_case(name):
    def fn(rank, world, case):
        import test_bad_input
        make = test_bad_input._bad_cases(rank)[name][0]

        def built():
            src, dst, kwargs = make()
            return src, dst, kwargs
        made, err = attempt("setup", built)
        if err:
            return {**err, "untouched": None}
        src, dst, kwargs = made
        snap = {k: v.clone() for k, v in dst.tensors.items() if v.device.type != "meta"} \
            if dst else {}
        import refit_engine
        _, err = attempt("plan", refit_engine.plan, src, dst, **kwargs)
        if err:
            return {**err, "untouched": all(_same_bits(dst.tensors[k], v) for k, v in snap.items())}
        return {"exact": None, "note": "plan() did not raise"}
    return fn


def _matrix_cases() -> list[Case]:
    try:
        import test_bad_input
    except Exception as exc:  # tests/ absent: the catalogue still runs its own cases
        return [Case("bad input matrix", None, skip=f"tests/test_bad_input.py: {exc}")]
    out = []
    for name, (_, tensor, ranks, words) in test_bad_input._bad_cases(0).items():
        out.append(Case(name, _matrix_case(name), tensor=tensor, ranks=ranks, words=words,
                        share="matrix", note="tests/test_bad_input.py matrix"))
    return out


# -- tensors replaced or resized after plan() --------------------------------------------------

def _mutation_case(side, how):
    """On rank 1, after plan(): replace / resize `side`'s tensor 'proj' (or the dict entry)."""
    def fn(rank, world, case):
        torch = _torch()

        def mutate(plan, src, dst, want):
            if rank != 1:
                return want
            model = src if side == "source" else dst
            t = model.tensors["proj"]
            fresh = _globals(9)["proj"].chunk(world, 0)[rank].clone() if side == "source" \
                else torch.empty_like(t).view(torch.uint8).fill_(POISON).view(t.dtype)
            if how == "data":
                t.data = fresh
            elif how == "resize":
                t.resize_(t.shape[0] * 4, t.shape[1])
            elif how == "storage":
                t.untyped_storage().resize_(0)
            elif how == "dict":
                model.tensors["proj"] = fresh
            if side == "source" and how in ("data", "dict"):
                # what the user means: refit the new values
                return {**want, "proj": torch.cat([_globals(0)["proj"][:0]] + [
                    _globals(9)["proj"].chunk(world, 0)[r] if r == 1 else
                    _globals(0)["proj"].chunk(world, 0)[r] for r in range(world)])}
            return want
        return run_refit(lambda: _pair(rank, world), after_plan=mutate)
    return fn


def _aliased_mutation(side):
    """plan(alias=True) with the layout unchanged (every destination shares its source's
    storage), then rank 1 gives `side`'s 'proj' new storage: caught like any replaced tensor."""
    def fn(rank, world, case):
        torch = _torch()

        def mutate(plan, src, dst, want):
            if rank == 1:
                t = (src if side == "source" else dst).tensors["proj"]
                t.data = torch.empty_like(t)
            return want
        return run_refit(lambda: _pair(rank, world, dst_tp=world), {"alias": True},
                         after_plan=mutate)
    return fn


# -- ranks late, stopped, absent or dead -------------------------------------------------------

def _die(kind):
    if kind == "exit":
        os._exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)  # the catalogue sends SIGCONT later
    if kind in ("late", "never"):
        time.sleep(LATE_S)
    if kind == "interrupt":
        raise KeyboardInterrupt  # Ctrl-C in the middle of a refit


def _rank_fault(kind, phase):
    """World 3, the last rank faulty. kind: late, stop, never, exit, sigkill; phase: plan,
    execute (before the check), mid (inside the transfer, at bucket 2)."""
    def fn(rank, world, case):
        import refit_engine
        faulty = world - 1
        src, dst, want = _pair(rank, world, src_tp=world, dst_tp=1)
        out = {}
        me = rank == faulty
        snap = snapshot(dst)
        plan = None
        if phase == "plan" and me:
            _die(kind)
        if not (phase == "plan" and me and kind == "never"):
            plan, err = attempt("plan", refit_engine.plan, src, dst, timeout_s=TIMEOUT_S,
                                bucket_bytes=64)
            if err:
                out.update(err, untouched=untouched(dst, snap))
        if plan is not None and phase in ("execute", "mid"):
            if me and phase == "execute":
                _die(kind)
            if me and phase == "mid":
                from refit_engine.executors.cpu import GlooExecutor
                real = GlooExecutor._post

                def post(self, bucket, _real=real):
                    if bucket == 2:
                        _die(kind)
                    return _real(self, bucket)
                plan.executor._post = post.__get__(plan.executor)
            if me and kind == "interrupt":
                try:
                    refit_engine.execute(plan)
                    out["problems"] = ["KeyboardInterrupt did not come out of execute()"]
                except KeyboardInterrupt:
                    out["exempt"] = True  # interrupted by its user: it has nothing to raise
                    if not plan.broken:
                        out["problems"] = ["plan.broken not set after a KeyboardInterrupt "
                                           "inside execute()"]
            elif not (me and kind == "never"):
                snap = snapshot(dst)
                _, err = attempt("execute", refit_engine.execute, plan)
                if err:
                    out.update(err, untouched=untouched(dst, snap) if phase == "execute" else None)
                    if not plan.broken:
                        out.setdefault("problems", []).append("plan.broken not set")
                else:
                    out["exact"] = exact(dst, want)
        if me and kind in ("late", "stop"):
            out["late"] = True  # raises too, but its clock includes its own lateness
        if me and kind == "never":
            out["exempt"] = True  # never called: nothing to raise
            time.sleep(LATE_S if phase != "plan" else 0)
        members = None if kind in ("late", "stop", "never") else tuple(range(world - 1))
        # A rank that skipped plan() is one plan behind the others: only the barrier is
        # meaningful afterwards (a fresh plan pairs its plan 0 with their plan 1).
        ok, why = _recover(rank, world, members, fresh_plan=(kind, phase) != ("never", "plan"))
        if not ok:
            out.setdefault("problems", []).append(f"group unusable afterwards: {why}")
        return out
    return fn


# -- two plans, crossed order ------------------------------------------------------------------

def _crossed_plans(verify, other_shapes):
    def fn(rank, world, case):
        import refit_engine
        shapes_b = {"fc1": (24, 16), "proj": (48, 8), "norm": (8,)} if other_shapes else SHAPES
        (sa, da, wa), err = attempt("setup", _pair, rank, world, seed=1)
        sb, db, wb = _pair(rank, world, seed=2, shapes=shapes_b)
        pa, err = attempt("plan", refit_engine.plan, sa, da, timeout_s=TIMEOUT_S)
        if err:
            return err
        pb, err = attempt("plan", refit_engine.plan, sb, db, timeout_s=TIMEOUT_S)
        if err:
            return err
        order = [(pa, da, wa), (pb, db, wb)]
        if rank == 1:
            order.reverse()
        first = None
        snaps = [snapshot(da), snapshot(db)]
        for plan, _, _ in order:
            _, err = attempt("execute", refit_engine.execute, plan, verify=verify)
            first = first or err
        # Each destination must hold either its poison or its own source's values.
        clean = all(untouched(d, s) or exact(d, w) for d, s, w in ((da, snaps[0], wa),
                                                                     (db, snaps[1], wb)))
        if first:
            return {**first, "untouched": clean}
        return {"exact": exact(da, wa) and exact(db, wb)}
    return fn


# -- ranks passing different options ----------------------------------------------------------

def _disagree(option):
    def fn(rank, world, case):
        plan_kw, exec_kw = dict(timeout_s=TIMEOUT_S), {}
        if option == "mode":
            plan_kw["mode"] = "non-collocated" if rank == 1 else "auto"
        elif option == "verify":
            exec_kw["verify"] = rank == 1
        elif option == "check":
            exec_kw["check"] = rank == 0
        elif option == "alias":
            plan_kw["alias"] = rank == 1
        elif option == "transport":
            plan_kw["transport"] = "nccl"  # CPU tensors: gloo carries them, on every rank
        elif option == "cast":  # a float32 destination (a cast) and an fp8_block128 one
            plan_kw["cast"] = rank != 1
            build = functools.partial(_formats_pair, with_cast=True)
            return _transform_case(build, plan_kw)(rank, world, case)
        out = run_refit(lambda: _pair(rank, world), plan_kw, exec_kw)
        if option == "check" and "untouched" in out:
            # the rank that opted out of the check copies its local pieces at once: the
            # destination is not expected to stay as it was, only the errors and the group
            out["untouched"] = None
        return out
    return fn


# -- the drop-in swap_model_weights ------------------------------------------------------------

def _swap_twice(src1, src2, dst):
    """The drop-in from src1, then from src2 into the same target: the first error, or None."""
    from refit_engine.megatron import swap_model_weights
    for what, src in (("swap 1", src1), ("swap 2 (new source)", src2)):
        _, err = attempt(what, swap_model_weights, src, dst, refit_method="gloo")
        if err:
            return err
    return None


def _swap_new_source(rank, world, case):
    src1, dst, _ = _pair(rank, world, seed=1)
    src2, _, want2 = _pair(rank, world, seed=2)
    return _swap_twice(src1, src2, dst) or {"exact": exact(dst, want2)}


def _swap_neither(rank, world, case):
    """World 3, non-collocated: source on rank 0, destination on rank 1, rank 2 holds neither
    model; two different refits (different shapes) through swap_model_weights."""
    from refit_engine.megatron import swap_model_weights
    shapes_b = {"fc1": (24, 16), "w2": (8, 8)}
    good = True
    for shapes, seed in ((SHAPES, 1), (shapes_b, 2)):
        src, dst, want = _pair(rank, world, src_tp=1, seed=seed, shapes=shapes,
                               src_ranks=(0,), dst_ranks=(1,))
        _, err = attempt(f"swap {seed}", swap_model_weights, src, dst, refit_method="gloo",
                         timeout_s=TIMEOUT_S)
        if err:
            return err
        good = good and exact(dst, want)
    return {"exact": good}


# -- concurrency, destroyed groups ------------------------------------------------------------

def _close_during_refit(rank, world, case):
    """Rank 0 closes its plan from another thread while a (slowed) refit runs on it: the refit
    must end exact, the plan closed, and nothing freed under it."""
    import time

    import refit_engine
    src, dst, want = _pair(rank, world)
    plan = refit_engine.plan(src, dst, timeout_s=TIMEOUT_S)
    closer = None
    if rank == 0:
        real, running = plan.executor.run, threading.Event()

        def slow_run(*args, **kwargs):
            running.set()
            time.sleep(0.5)
            return real(*args, **kwargs)
        plan.executor.run = slow_run
        closer = threading.Thread(target=lambda: running.wait(TIMEOUT_S) and plan.close())
        closer.start()
    _, err = attempt("execute", refit_engine.execute, plan)
    if closer is not None:
        closer.join(timeout=TIMEOUT_S)
        if closer.is_alive():
            return {"problems": ["close() is still waiting"], "exact": False}
    if err:
        return {**err, "untouched": None}
    closed = rank != 0 or plan.broken == "closed"
    return {"exact": exact(dst, want) and closed}


def _two_threads(rank, world, case):
    import refit_engine
    src, dst, want = _pair(rank, world)
    plan = refit_engine.plan(src, dst, timeout_s=TIMEOUT_S)
    snap = snapshot(dst)
    results = [None, None]
    start = threading.Barrier(2)

    def go(i):
        start.wait()
        results[i] = attempt("execute (thread)", refit_engine.execute, plan)[1]
    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * TIMEOUT_S + 5)
    if any(t.is_alive() for t in threads):
        return {"problems": ["a thread is still inside execute()"], "exact": False}
    errors = [r for r in results if r]
    if not errors:
        return {"exact": exact(dst, want)}
    bad = [e for e in errors if not e["refit"]]
    out = dict(bad[0] if bad else errors[0])
    out["untouched"] = untouched(dst, snap) or exact(dst, want)
    return out


def _destroyed_group(which):
    def fn(rank, world, case):
        import refit_engine
        dist = _dist()
        src, dst, want = _pair(rank, world)
        snap = snapshot(dst)
        if which == "plan on destroyed":
            g = dist.new_group(list(range(world)))
            # Every rank has finished connecting the group before any destroys it (a rank
            # still in new_group's handshake would see its peer close the connection).
            dist.barrier()
            dist.destroy_process_group(g)
            _, err = attempt("plan", refit_engine.plan, src, dst, group=g, timeout_s=TIMEOUT_S)
            return {**(err or {"exact": False, "note": "plan() on a destroyed group worked"}),
                    "untouched": untouched(dst, snap)}
        g = dist.new_group(list(range(world))) if which == "subgroup" else None
        plan = refit_engine.plan(src, dst, group=g, timeout_s=TIMEOUT_S)
        dist.destroy_process_group(g)
        _, err = attempt("execute", refit_engine.execute, plan)
        if err:
            return {**err, "untouched": untouched(dst, snap)}
        return {"exact": exact(dst, want)}
    return fn


# -- bad input, legitimate odd input -----------------------------------------------------------

def _input_case(build, plan_kw=None, exec_kw=None, after_plan=None, executes=1):
    """build(rank, world) -> (src, dst, expected)."""
    def fn(rank, world, case):
        return run_refit(lambda: build(rank, world), plan_kw, exec_kw, after_plan, executes)
    return fn


def _replace(model, name, tensor, shape, split=None, part=0, **kw):
    model.entries = [e for e in model.entries if e.key != name]
    model.tensors.pop(name, None)
    model.add(name, tensor, shape, split, part, **kw)


def _overlapping_destinations(rank, world):
    torch = _torch()
    src, dst, want = _pair(rank, world)
    base = torch.empty(48 * 16 + 24 * 24, dtype=torch.bfloat16).view(torch.uint8).fill_(POISON) \
        .view(torch.bfloat16)
    fc1 = base[: 48 * 16].view(48, 16)
    proj = base[48 * 16 - 64: 48 * 16 - 64 + 24 * 24].view(24, 24)  # last 64 of fc1 shared
    _replace(dst, "fc1", fc1, (48, 16))
    _replace(dst, "proj", proj, (24, 24))
    return src, dst, want


def _destination_over_source(rank, world):
    src, dst, want = _pair(rank, world)
    # this rank's source fc1 (rows of fc1) reinterpreted as the destination's norm (16 values)
    over = src.tensors["fc1"].reshape(-1)[:16]
    _replace(dst, "norm", over, (16,))
    return src, dst, want


def _reshaped_local(rank, world):
    torch = _torch()
    src, dst, want = _pair(rank, world)
    t = torch.empty(16, 36, dtype=torch.bfloat16).view(torch.uint8).fill_(POISON) \
        .view(torch.bfloat16)  # 576 elements like (24, 24), another shape
    _replace(dst, "proj", t, (24, 24))
    return src, dst, want


def _zero_size(rank, world):
    shapes = dict(SHAPES, empty_rows=(0, 16), empty_cols=(16, 0), empty_1d=(0,))
    return _pair(rank, world, shapes=shapes)


def _sparse(side):
    def build(rank, world):
        src, dst, want = _pair(rank, world)
        model = src if side == "source" else dst
        dense = model.tensors["proj"]
        _replace(model, "proj", dense.to_sparse(), (24, 24),
                 *((__import__("refit_engine").Split(0, world), rank) if side == "source"
                   else ()))
        return src, dst, want
    return build


def _numpy(rank, world):
    return _pair(rank, world, lib="numpy")


def _numpy_read_only(rank, world):
    src, dst, want = _pair(rank, world, lib="numpy")
    dst.tensors["proj"].flags.writeable = False
    return src, dst, want


def _numpy_reversed(rank, world):
    src, dst, want = _pair(rank, world, lib="numpy")
    flipped = dst.tensors["norm"][::-1]
    _replace(dst, "norm", flipped, (16,))
    return src, dst, want


def _expanded_source(rank, world):
    torch = _torch()
    src, dst, want = _pair(rank, world)
    row = torch.zeros(24, dtype=torch.bfloat16)
    local = src.tensors["proj"]
    _replace(src, "proj", row.expand(*local.shape), (24, 24),
             __import__("refit_engine").Split(0, world), rank)
    return src, dst, want


def _column_view_source(rank, world):
    torch = _torch()
    from refit_engine import Split
    src, dst, want = _pair(rank, world)
    local = src.tensors["proj"]
    wide = torch.zeros(local.shape[0], 48, dtype=local.dtype)
    wide[:, :24] = local
    _replace(src, "proj", wide[:, :24], (24, 24), Split(0, world), rank)
    return src, dst, want


def _meta_source(rank, world):
    torch = _torch()
    from refit_engine import Split
    src, dst, want = _pair(rank, world)
    if rank == 1:
        _replace(src, "proj", torch.empty(24 // world, 24, dtype=torch.bfloat16, device="meta"),
                 (24, 24), Split(0, world), rank)
    return src, dst, want


def _replica_dtype(rank, world):
    src, dst, want = _pair(rank, world)
    if rank == 1:  # the replicated norm in float32 on this rank only
        _replace(src, "norm", src.tensors["norm"].float(), (16,))
    return src, dst, want


def _requires_grad(rank, world):
    torch = _torch()
    src, dst, want = _pair(rank, world)
    for model in (src, dst):
        for key in list(model.tensors):
            p = torch.nn.Parameter(model.tensors[key], requires_grad=True)
            model.tensors[key] = p
    return src, dst, want


def _autograd_views(rank, world):
    torch = _torch()
    from refit_engine import Split
    src, dst, want = _pair(rank, world)
    leaf = torch.nn.Parameter(torch.zeros(2, *dst.tensors["proj"].shape, dtype=torch.bfloat16))
    with torch.no_grad():
        leaf.view(torch.uint8).fill_(POISON)
    view = leaf[1]  # a non-leaf view with a grad_fn (SelectBackward)
    _replace(dst, "proj", view, (24, 24))
    s_leaf = torch.nn.Parameter(src.tensors["fc1"].clone())
    _replace(src, "fc1", s_leaf.view(-1).view(s_leaf.shape), (48, 16), Split(0, world), rank)
    return src, dst, want


def _view_into_larger(rank, world):
    """Destination tensors as contiguous slices of one flat buffer (megatron's param buffer);
    the bytes around them must stay as they were."""
    torch = _torch()
    src, dst, want = _pair(rank, world)
    sizes = {k: v.numel() for k, v in dst.tensors.items()}
    flat = torch.empty(sum(sizes.values()) + 64, dtype=torch.bfloat16)
    flat.view(torch.uint8).fill_(0x3C)
    offset = 32
    for key, size in sizes.items():
        shape = dst.tensors[key].shape
        view = flat[offset:offset + size].view(shape)
        view.view(torch.uint8).fill_(POISON)
        _replace(dst, key, view, SHAPES[key])
        offset += size
    guard = flat.clone()
    want = dict(want)
    want["__flat__"] = (flat, guard, sum(sizes.values()))
    return src, dst, want


def _check_flat(fn):
    """Wraps a case: the guard bytes of _view_into_larger's flat buffer are unchanged."""
    def wrapped(rank, world, case):
        holder = {}

        def build(r, w):
            src, dst, want = _view_into_larger(r, w)
            holder["flat"] = want.pop("__flat__")
            return src, dst, want
        out = run_refit(lambda: build(rank, world))
        flat, guard, n = holder.get("flat", (None, None, 0))
        if flat is not None and not (_same_bits(flat[:32], guard[:32])
                                     and _same_bits(flat[32 + n:], guard[32 + n:])):
            out["exact"] = False
            out["note"] = "bytes outside the views changed"
        return out
    return wrapped


def _bad_add(**add_kw):
    """A source tensor added with a bad argument (the rest of the model is fine)."""
    def build(rank, world):
        src, dst, want = _pair(rank, world)
        kw = dict(add_kw)
        name = kw.pop("name", "proj")
        tensor = kw.pop("tensor", None)
        if tensor is None:
            tensor = src.tensors["proj"]
        shape = kw.pop("global_shape", (24, 24))
        from refit_engine import Split
        split = Split(0, kw.pop("parts", world))
        part = kw.pop("part", rank)
        src.entries = [e for e in src.entries if e.key != "proj"]
        src.tensors.pop("proj")
        src.add(name, tensor, shape, split, part, **kw)
        return src, dst, want
    return build


def _corrupt_after_transfer(rank, world):
    """verify=True must catch a destination byte that changed in flight (rank 1's fc1)."""

    def make():
        return _pair(rank, world)

    def corrupt(plan, src, dst, want):
        if rank == 1:
            real = plan.executor.run

            def run(*a, **k):
                result = real(*a, **k)
                dst.tensors["fc1"].view(_torch().uint8).reshape(-1)[7] ^= 0x10
                return result
            plan.executor.run = run
        return want
    out = run_refit(make, exec_kw=dict(verify=True), after_plan=corrupt)
    out["untouched"] = None  # bytes moved on purpose
    return out


def _repeat_after_failure(rank, world):
    """A plan whose source tensor was replaced (owner recorded, as the megatron adapter does):
    execute raises; executing it again raises again and still writes nothing."""
    torch = _torch()

    def make():
        src, dst, want = _pair(rank, world)
        owner = torch.nn.Parameter(src.tensors["proj"], requires_grad=False)
        src.current["proj"] = owner
        make.owner = owner
        return src, dst, want

    def mutate(plan, src, dst, want):
        if rank == 1:
            make.owner.data = torch.zeros(3, 3, dtype=torch.bfloat16)
        return want

    def fn():
        import refit_engine
        made = make()
        src, dst, want = made
        plan = refit_engine.plan(src, dst)
        mutate(plan, src, dst, want)
        results = []
        for i in range(3):
            snap = snapshot(dst)
            _, err = attempt(f"execute #{i + 1}", refit_engine.execute, plan)
            if err is None:
                return {"exact": exact(dst, want), "note": f"execute #{i + 1} did not raise"}
            err["untouched"] = untouched(dst, snap)
            results.append(err)
        bad = [r for r in results if not r["refit"] or not r["untouched"]]
        return bad[0] if bad else {**results[0], "note": "; then ".join(
            r["reason"][:60] for r in results[1:])}
    return fn()


def _world_of_one(rank, world):
    """One rank: source in two TP parts (two local tensors) to one destination tensor."""
    torch = _torch()
    from refit_engine import ShardedTensors, Split
    values = _globals(3)
    src, dst, want = ShardedTensors(), ShardedTensors(), {}
    for name, shape in SHAPES.items():
        full = values[name]
        if len(shape) == 2:
            for part, piece in enumerate(full.chunk(2, 0)):
                src.add(name, piece.clone(), shape, Split(0, 2), part, key=f"{name}.{part}")
        else:
            src.add(name, full.clone(), shape)
        t = torch.empty_like(full)
        t.view(torch.uint8).fill_(POISON)
        dst.add(name, t, shape)
        want[name] = full
    return src, dst, want


def _every_dtype(rank, world):
    """One tensor of every dtype the plan compiler knows, random bytes (bool: 0 / 1)."""
    torch = _torch()
    from refit_engine import dtypes
    g = torch.Generator().manual_seed(4)
    values = {}
    for name in dtypes._DTYPES:
        dtype = getattr(torch, name)
        size = dtypes.itemsize(name)
        raw = torch.randint(0, 256, (48 * 16 * size,), generator=g, dtype=torch.uint8)
        if dtype == torch.bool:
            raw = raw % 2
        values[f"t_{name}"] = raw.view(dtype).view(48, 16)
    return _pair(rank, world, values=values)


def _special_bits(rank, world):
    """NaNs with payloads (quiet, signalling, negative), -0.0, denormals, inf: bit-exact."""
    torch = _torch()
    bf16 = torch.tensor([0x7FC1, 0x7F81, -0x3D, -0x8000, 0x0001, 0x7F80, 0x7FFF, 0x0080],
                        dtype=torch.int16).repeat(96).view(torch.bfloat16).view(48, 16)
    f32 = torch.tensor([0x7FC00001, 0x7F800001, -0x3FFFFF, -0x80000000, 0x1, 0x7F800000,
                        0x7FFFFFFF, 0x00800000], dtype=torch.int32).repeat(96) \
        .view(torch.float32).view(48, 16)
    return _pair(rank, world, values={"bf16": bf16, "f32": f32})


def _four_dims_last_split(rank, world):
    """A 4-D tensor split on its last dim (TP=world) to one split on dim 1."""
    torch = _torch()
    from refit_engine import ShardedTensors, Split
    full = torch.randn(2, 6, 4, 8, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w4", full.chunk(world, 3)[rank].contiguous(), full.shape, Split(3, world), rank)
    mine = full.chunk(world, 1)[rank].contiguous()
    poisoned = torch.empty_like(mine)
    poisoned.view(torch.uint8).fill_(POISON)
    dst.add("w4", poisoned, full.shape, Split(1, world), rank)
    return src, dst, {"w4": mine}


def _no_tensors(rank, world):
    from refit_engine import ShardedTensors
    return ShardedTensors(), ShardedTensors(), {}


# -- destinations in another format (issue 16: refit_engine/transforms.py) ---------------------

QSHAPE = (256, 128)  # "qw": two 128 x 128 blocks of fp8_block128, scales (2, 1)


def _poisoned(shape, dtype):
    torch = _torch()
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(POISON)
    return t


def _formats_pair(rank, world, q_src=None, q_parts=1, scale_of=None, with_cast=False):
    """_pair (plain tensors, destination TP=1) plus "qw" QSHAPE: source q_src (default bf16,
    TP=world on dim 0), destination fp8_block128 in q_parts parts on dim 0; with_cast: also
    "cw" (32, 16), bf16 source, float32 destination (a cast). Destination and scales
    poisoned; scale_of(rank, local shape) gives the scale tensor to pass (None: add()
    allocates one). Expected values: the plain tensors only (a refused case never gets to
    "qw" / "cw"); under "__watch__" arrays to check untouched that the destination may not
    hold (a tensor and scale add() refused)."""
    torch = _torch()
    from refit_engine import Split
    src, dst, want = _pair(rank, world)
    full = torch.randn(QSHAPE, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    if q_src is not None:  # a dtype name
        dtype = getattr(torch, q_src)
        full = full.to(dtype) if dtype.is_floating_point else \
            torch.arange(full.numel(), dtype=dtype).view(QSHAPE)
    src.add("qw", full.chunk(world, 0)[rank].clone(), QSHAPE, Split(0, world), rank)
    split = Split(0, q_parts) if q_parts > 1 else None
    local = split.local_shape("qw", QSHAPE) if split else QSHAPE
    t = _poisoned(local, torch.float8_e4m3fn)
    scale = scale_of(rank, local) if scale_of else None
    dst.add("qw", t, QSHAPE, split, rank % q_parts, format="fp8_block128", scale=scale)
    for s in dst.scales.values():
        s.view(torch.uint8).fill_(POISON)
    want["__watch__"] = {"qw (as given)": t, "qw (scale, as given)": scale}
    if with_cast:
        cw = torch.randn(32, 16, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
        src.add("cw", cw.chunk(world, 0)[rank].clone(), (32, 16), Split(0, world), rank)
        dst.add("cw", _poisoned((32, 16), torch.float32), (32, 16))
    return src, dst, want


def _wrong_scale_shape(rank, local):
    """Rank 1's scale tensor of shape (2, 2) instead of (2, 1); the others right."""
    rows, cols = -(-local[0] // 128), -(-local[1] // 128)
    return _poisoned((rows, cols + (rank == 1)), _torch().float32)


def _transform_case(build, plan_kw=None, after_plan=None, watch_later=None):
    """run_refit over build(rank, world), the destination's scale tensors checked untouched
    too (snapshot includes them); also every array under want["__watch__"] (and those
    watch_later(src, dst) returns after plan()), and, when nothing raised, whether the bad
    input went through and changed the destination (silent_wrong) or not (accepted)."""
    def fn(rank, world, case):
        held = {}

        def make():
            src, dst, want = build(rank, world)
            held["watch"] = {k: v for k, v in want.pop("__watch__", {}).items()
                             if v is not None}
            held["dst"] = dst
            held["snap"] = snapshot(dst)
            held["watch_snap"] = {k: _bits(v) for k, v in held["watch"].items()}
            return src, dst, want

        def mutate(plan, src, dst, want):
            if watch_later is not None:
                for k, v in watch_later(src, dst).items():
                    held["watch"][k], held["watch_snap"][k] = v, _bits(v)
            return after_plan(plan, src, dst, want) if after_plan else want
        out = run_refit(make, plan_kw, after_plan=mutate)
        watched = all(_same_bits(_bits(v), held["watch_snap"][k])
                      for k, v in held.get("watch", {}).items())
        if "error_type" in out and out.get("untouched") is not None:
            out["untouched"] = out["untouched"] and watched
        elif "error_type" not in out and "dst" in held:
            out["untouched"] = untouched(held["dst"], held["snap"]) and watched
        return out
    return fn


def _replace_scale(plan, src, dst, want):
    """Rank 1 puts a new (poisoned) scale tensor in dst.scales after plan()."""
    if plan.rank == 1:
        dst.scales["qw"] = _poisoned(tuple(dst.scales["qw"].shape), _torch().float32)
    return want


def _old_scale(src, dst):
    """The scale tensor the plan bound, checked untouched after it was replaced."""
    return {"qw (scale bound by the plan)": dst.scales["qw"]}


# -- megatron-core models ----------------------------------------------------------------------

def _megatron_models(rank, world, dst_dtype="bfloat16", seeds=(11,)):
    import warnings
    warnings.filterwarnings("ignore")
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    import dataclasses
    cfg = KimiK2Config.toy(num_layers=2, num_experts=4)
    s, d = ParallelGrid(world, tp=2, etp=2), ParallelGrid(world, tp=1)
    sp, dp = build_process_groups(s), build_process_groups(d)
    srcs = [build_kimi_k2(cfg, s, sp, seed=seed) for seed in seeds]
    dcfg = dataclasses.replace(cfg, dtype=dst_dtype) if dst_dtype != cfg.dtype else cfg
    dst = build_kimi_k2(dcfg, d, dp, seed=22)
    return srcs, dst


def _megatron_swap_new_source(rank, world, case):
    import refit_engine
    from refit_engine.verify import check_exact
    (src1, src2), dst = _megatron_models(rank, world, seeds=(11, 12))
    err = _swap_twice(src1, src2, dst)
    if err:
        return err
    reference = refit_engine.plan(src2, dst)  # planned, not executed: check_exact's view
    wrong = check_exact(reference)
    return {"exact": not wrong, "note": f"{len(wrong)} tensors hold the old source" if wrong
            else ""}


def _megatron_changed_after_plan(change):
    """change(torch, src, dst) on rank 1 after plan(): the refit must refuse it before any
    byte moves (a missed change writes into an orphaned or reallocated tensor)."""
    def fn(rank, world, case):
        torch = _torch()
        (src,), dst = _megatron_models(rank, world)

        def mutate(plan, s, d, want):
            if rank == 1:
                change(torch, src, dst)
            return want
        return run_refit(lambda: (src, dst, {}), after_plan=mutate)
    return fn


def _new_param_data(torch, src, dst):
    p = dict(src[0].named_parameters())["decoder.final_layernorm.weight"]
    p.data = p.data.clone()  # same shape and values, new storage


def _new_module_parameter(torch, src, dst):
    norm = dst[0].decoder.final_layernorm
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone())


def _new_module_buffer(torch, src, dst):
    router = next(m for m in dst[0].modules()
                  if m._buffers.get("expert_bias") is not None)
    router.expert_bias = router.expert_bias.clone()


def _megatron_dtypes(rank, world, case):
    (src,), dst = _megatron_models(rank, world, dst_dtype="float32")

    def make():
        return src, dst, {}
    return run_refit(make)


def _megatron_swap_bf16_bias(rank, world, case):
    """The drop-in into a destination whose router expert_bias is bf16 (as Float16Module
    leaves an inference model) from an fp32 one: the destination takes fp32 and the source's
    values (megatron-core's buffer dtype harmonization), bit-exactly."""
    torch = _torch()
    import refit_engine
    from refit_engine.megatron import swap_model_weights
    from refit_engine.verify import check_exact
    (src,), dst = _megatron_models(rank, world)
    for module in dst[0].modules():
        if module._buffers.get("expert_bias") is not None:
            module.expert_bias = torch.full_like(module.expert_bias, 7, dtype=torch.bfloat16)
    _, err = attempt("swap", swap_model_weights, src, dst, "gloo", timeout_s=30)
    if err:
        return err
    dtypes = {str(b.dtype) for n, b in dst[0].named_buffers() if n.endswith("expert_bias")}
    wrong = check_exact(refit_engine.plan(src, dst))
    return {"exact": not wrong and dtypes == {"torch.float32"},
            "note": f"expert_bias {sorted(dtypes)}, {len(wrong)} tensors wrong"}


def _megatron_swap_offset_outside(rank, world, case):
    """src_rank_offset=1 on a world of 2: the source's TP ranks [0, 1] + 1 = [1, 2], and the
    group has no rank 2: refused on every rank before any byte moves."""
    from refit_engine.megatron import swap_model_weights
    (src,), dst = _megatron_models(rank, world)
    snap = snapshot(dst)
    _, err = attempt("swap", swap_model_weights, src, dst, "gloo", src_rank_offset=1,
                     timeout_s=30)
    return {**err, "untouched": untouched(dst, snap)} if err else {"exact": False}


def _megatron_mtp(rank, world, case):
    """MTP-layer experts moving between ranks (EP2/ETP2 -> EP2/ETP1 on 4 ranks): named by
    global expert index, so they land on the right experts; checked bit-exactly."""
    import warnings
    warnings.filterwarnings("ignore")
    torch = _torch()
    import refit_engine
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.megatron_builder import (_canonical_values, build_kimi_k2,
                                                              build_process_groups)
    from refit_engine.verify import check_exact
    cfg = KimiK2Config.toy(num_layers=2, num_experts=8)
    s, d = ParallelGrid(world, tp=2, ep=2, etp=2), ParallelGrid(world, tp=2, ep=2, etp=1)
    src = build_kimi_k2(cfg, s, build_process_groups(s), seed=11, mtp_num_layers=1)
    dst_groups = build_process_groups(d)
    dst = build_kimi_k2(cfg, d, dst_groups, seed=22, mtp_num_layers=1)
    if not any(".mtp." in f".{n}" for n, _ in dst[0].named_parameters()):
        return {"problems": ["the destination has no MTP layer"], "exact": False}
    with torch.no_grad():
        for t in list(dst[0].parameters()) + list(dst[0].buffers()):
            t.view(torch.uint8).fill_(0xA5) if t.is_contiguous() else None
    plan, err = attempt("plan", refit_engine.plan, src, dst)
    if err:
        return err
    _, err = attempt("execute", refit_engine.execute, plan)
    if err:
        return err
    wrong = check_exact(plan)
    # check_exact compares against the adapter's own canonical names, which a wrong expert
    # index would fool: also check each MTP expert against the source's draw of the expert
    # megatron's EP rank says it is (whole experts: etp=1 on the destination).
    first = dst_groups.ep.rank() * (8 // d.ep)
    for name, param in dst[0].named_parameters():
        if name.startswith("mtp.") and ".local_experts." in name:
            head, tail = name.split(".local_experts.")
            k, rest = tail.split(".", 1)
            want = _canonical_values(f"{head}.{first + int(k)}.{rest}", tuple(param.shape), 11)
            if not torch.equal(param.detach(), want.to(param.dtype)):
                wrong.append(name)
    return {"exact": not wrong, "note": f"wrong: {wrong[:3]}" if wrong else ""}


# -- the catalogue -----------------------------------------------------------------------------

def cases() -> list[Case]:
    out = _matrix_cases()
    C = Case

    # Tensors replaced after plan(): a world each (a missed one writes into freed memory).
    for side in ("source", "destination"):
        for how, words in (("data", "replaced"), ("resize", "replaced"), ("storage", "replaced"),
                           ("dict", "replaced")):
            label = {"data": "t.data = ...", "resize": "t.resize_()",
                     "storage": "t.untyped_storage().resize_(0)",
                     "dict": f"{'src' if side == 'source' else 'dst'}.tensors[k] = ..."}[how]
            out.append(C(f"{side} {label} after plan", _mutation_case(side, how),
                         tensor="proj", ranks=[1], deadline=15))
        out.append(C(f"aliased {side} t.data = ... after plan(alias=True)",
                     _aliased_mutation(side), tensor="proj", ranks=[1], deadline=15))

    # Ranks late, stopped, absent, dead: world 3, the last rank faulty, timeout_s 1.5 s.
    fault_deadline = TIMEOUT_S + LATE_S + 2 * SYNC_S + 4
    for kind, phase, label in (
            ("late", "plan", "rank late to plan() (sleeps past timeout_s)"),
            ("late", "execute", "rank late to execute() (sleeps past timeout_s)"),
            ("stop", "plan", "rank SIGSTOPped before plan(), resumed later"),
            ("stop", "mid", "rank SIGSTOPped mid-transfer, resumed later"),
            ("never", "plan", "rank never calls plan()"),
            ("never", "execute", "rank never calls execute()"),
            ("exit", "plan", "rank dies (os._exit) before plan()"),
            ("exit", "execute", "rank dies (os._exit) before execute()"),
            ("exit", "mid", "rank dies (os._exit) mid-transfer"),
            ("sigkill", "mid", "rank killed by SIGKILL mid-transfer"),
            ("interrupt", "mid", "KeyboardInterrupt on one rank mid-transfer")):
        out.append(C(label, _rank_fault(kind, phase), world=3, same_error=False,
                     timed=TIMEOUT_S, deadline=fault_deadline, sync=False,
                     dying=frozenset({2}) if kind in ("exit", "sigkill") else frozenset(),
                     resume_after=LATE_S if kind == "stop" else None))

    out += [
        C("two plans executed in crossed order (same shapes)", _crossed_plans(False, False),
          same_error=False, timed=TIMEOUT_S, deadline=15),
        C("two plans in crossed order, verify=True", _crossed_plans(True, False),
          same_error=False, timed=TIMEOUT_S, deadline=15),
        C("two plans in crossed order (different shapes)", _crossed_plans(False, True),
          same_error=False, timed=TIMEOUT_S, deadline=15),
        C("swap_model_weights with a new source model", _swap_new_source, expect="ok",
          share="api"),
        C("swap_model_weights, rank holding neither model, two refits", _swap_neither,
          expect="ok", world=3, deadline=15),
        C("ranks pass different modes", _disagree("mode"), same_error=False,
          timed=TIMEOUT_S, deadline=15),
        C("verify=True on one rank only", _disagree("verify"), same_error=False,
          timed=TIMEOUT_S, deadline=15),
        C("check=False on one rank only", _disagree("check"), same_error=False,
          timed=TIMEOUT_S, deadline=15),
        C("alias=True on one rank only", _disagree("alias"), deadline=15),
        C("transport='nccl' with CPU tensors", _disagree("transport"), deadline=15),
        C("cast=True on one rank only (cast and fp8 destinations)", _disagree("cast"),
          words="disagree", ranks=[0, 1], deadline=15),
        C("two threads execute one plan at once", _two_threads, expect="either",
          same_error=False, deadline=15),
        C("close() from another thread during a refit", _close_during_refit, expect="ok",
          deadline=15),
        # A plan owns its channel (refit_engine/channel.py): the caller's group may go.
        C("execute after its subgroup was destroyed", _destroyed_group("subgroup"),
          expect="ok", deadline=15),
        C("execute after the default group was destroyed", _destroyed_group("default"),
          expect="ok", deadline=15, sync=False),
        C("plan() on a destroyed group", _destroyed_group("plan on destroyed"), deadline=15),
        C("repeated execute after a failure (tensor replaced)",
          lambda r, w, c: _repeat_after_failure(r, w), tensor="proj", ranks=[1],
          words="replaced", deadline=15),
    ]

    I = _input_case
    inputs = [
        ("overlapping destination tensors", I(_overlapping_destinations), "error", None, None,
         "share memory"),
        ("destination laid over a source tensor", I(_destination_over_source), "error", None,
         None, "share memory"),
        ("local shape differs from part shape (equal numel)", I(_reshaped_local), "error",
         "proj", None, "shape"),
        ("zero-size tensors", I(_zero_size), "ok", None, None, None),
        ("sparse source tensor", I(_sparse("source")), "error", "proj", None, "sparse"),
        ("sparse destination tensor", I(_sparse("destination")), "error", "proj", None,
         "sparse"),
        ("NumPy arrays", I(_numpy), "ok", None, None, None),
        ("NumPy arrays with verify=True", I(_numpy, exec_kw=dict(verify=True)), "ok", None,
         None, None),
        ("read-only NumPy destination", I(_numpy_read_only), "error", "proj", None,
         "read-only"),
        ("negative-stride NumPy destination", I(_numpy_reversed), "error", "norm", None,
         "contiguous"),
        ("expanded (stride 0) source", I(_expanded_source), "error", "proj", None,
         "contiguous"),
        ("source is a column slice (non-contiguous view)", I(_column_view_source), "error",
         "proj", None, "contiguous"),
        ("meta source tensor on one rank", I(_meta_source), "error", "proj", [1], "meta"),
        ("source replicas disagree on dtype", I(_replica_dtype), "error", "norm", None,
         "differ"),
        ("tensors requiring grad (parameters)", I(_requires_grad), "ok", None, None, None),
        ("every supported dtype (bool, ints, uints, floats, float8)", I(_every_dtype), "ok",
         None, None, None),
        ("NaN payloads, -0.0, denormals, inf stay bit-exact", I(_special_bits), "ok", None,
         None, None),
        ("4-D tensor split on its last dim to a split on dim 1", I(_four_dims_last_split), "ok",
         None, None, None),
        ("autograd views (non-leaf, grad_fn)", I(_autograd_views), "ok", None, None, None),
        ("destinations are views into one larger buffer", _check_flat(None), "ok", None, None,
         None),
        ("verify=True catches a destination byte changed in flight",
         lambda r, w, c: _corrupt_after_transfer(r, w),
         "error", "fc1", None, "verification failed"),
        ("verify=True with sync=False", I(lambda r, w: _pair(r, w),
                                           exec_kw=dict(verify=True, sync=False)),
         "error", None, None, "sync"),
        ("bucket_bytes smaller than one element (1)", I(lambda r, w: _pair(r, w),
                                                        plan_kw=dict(bucket_bytes=1)),
         "either", None, None, None),
        ("two plans of the same models, same order", I(lambda r, w: _pair(r, w),
                                                       executes=2), "ok", None, None, None),
        ("no tensors at all on any rank", I(_no_tensors), "either", None, None, None),
        ("Split with 0 parts", I(_bad_add(parts=0)), "error", None, None, None),
        ("negative offset in add()", I(_bad_add(offset=-8, part_shape=None)), "error",
         "proj", None, None),
        ("negative dim in global shape", I(_bad_add(global_shape=(-24, 24))), "error", "proj",
         None, None),
        ("float dim in global shape", I(_bad_add(global_shape=(24.5, 24))), "error", "proj",
         None, None),
        ("huge global shape (2**62 rows)", I(_bad_add(global_shape=(2 ** 62, 24))), "error",
         "proj", None, None),
        ("part given as a string", I(_bad_add(part="1")), "error", "proj", None, None),
        ("tensor name not a string", I(_bad_add(name=5)), "error", None, None, None),
    ]
    for name, fn, expect, tensor, ranks, words in inputs:
        out.append(C(name, fn, expect=expect, tensor=tensor, ranks=ranks, words=words,
                     share="input"))

    kwargs = [
        ("timeout_s negative", dict(timeout_s=-1.0)),
        ("timeout_s zero", dict(timeout_s=0)),
        ("timeout_s NaN", dict(timeout_s=float("nan"))),
        ("timeout_s huge (1e300)", dict(timeout_s=1e300)),
        ("timeout_s a string", dict(timeout_s="5")),
        ("bucket_bytes negative", dict(bucket_bytes=-4096)),
        ("bucket_bytes a float", dict(bucket_bytes=4096.5)),
        ("bucket_bytes huge (2**64)", dict(bucket_bytes=2 ** 64)),
        ("bucket_bytes a string", dict(bucket_bytes="4096")),
        ("threads zero", dict(threads=0)),
        ("threads negative", dict(threads=-2)),
        ("threads a float", dict(threads=1.5)),
        ("mode unknown", dict(mode="sideways")),
        ("ranks_per_node negative", dict(ranks_per_node=-1)),
        ("ranks_per_node a string", dict(ranks_per_node="8")),
    ]
    for name, kw in kwargs:
        word = next(iter(kw))
        out.append(C(name, I(lambda r, w: _pair(r, w), plan_kw=kw), words=word, share="kwargs"))

    # Destinations in another format (issue 16): refused on every rank before any byte
    # moves, the destination and its scale tensors still poisoned.
    T, F = _transform_case, functools.partial
    out += [
        C("fp8_block128 shard cuts a block (256 rows TP4, 64-row shards)",
          T(F(_formats_pair, q_parts=4)), world=4, tensor="qw", ranks=[0],
          words="cuts a block", share="formats"),
        C("int32 source into an fp8_block128 destination", T(F(_formats_pair, q_src="int32")),
          tensor="qw", ranks=[0], words="needs a float32, bfloat16 or float16 source, not int32",
          share="formats"),
        C("bf16 source, float32 destination, no cast=True", T(F(_formats_pair, with_cast=True)),
          tensor="cw", ranks=[0, 1], words="dtype differs", share="formats"),
        C("fp8_block128 scale tensor of the wrong shape (one rank)",
          T(F(_formats_pair, scale_of=_wrong_scale_shape)), tensor="qw", ranks=[1],
          words="scale tensor must be float32 of shape (2, 1)", share="formats"),
        # a world of its own, like the other tensors replaced under a plan
        C("scale tensor replaced in dst.scales after plan",
          T(_formats_pair, after_plan=_replace_scale, watch_later=_old_scale),
          tensor="qw (scale)", ranks=[1], words="replaced after planning", deadline=15),
    ]

    out.append(C("world of 1", I(_world_of_one), expect="ok", world=1))
    out += [
        C("megatron: swap_model_weights with a new source model", _megatron_swap_new_source,
          expect="ok", share="megatron", needs="megatron", deadline=90),
        C("megatron: source parameter .data replaced after plan",
          _megatron_changed_after_plan(_new_param_data),
          words="replaced", ranks=[1], share="megatron", needs="megatron", deadline=60),
        C("megatron: destination parameter reassigned on its module after plan",
          _megatron_changed_after_plan(_new_module_parameter), words="replaced", ranks=[1], share="megatron",
          needs="megatron", deadline=60),
        C("megatron: destination buffer reassigned on its module after plan",
          _megatron_changed_after_plan(_new_module_buffer), words="replaced", ranks=[1], share="megatron",
          needs="megatron", deadline=60),
        C("megatron: models on different dtypes (bf16 -> fp32)", _megatron_dtypes,
          words="dtype differs between source and destination (bfloat16 and float32)",
          share="megatron", needs="megatron", deadline=60),
        C("megatron: swap_model_weights, bf16 destination expert_bias from fp32 (harmonized)",
          _megatron_swap_bf16_bias, expect="ok", share="megatron", needs="megatron",
          deadline=60),
        C("megatron: swap_model_weights, rank offset mapping outside the group",
          _megatron_swap_offset_outside, words="rank-offset mismatch", ranks=[0, 1],
          share="megatron", needs="megatron", deadline=60),
        C("megatron: MTP-layer experts with EP on both sides", _megatron_mtp, expect="ok",
          world=4, needs="megatron", deadline=120),
    ]
    return out


# =============================================================================================
# Running worlds
# =============================================================================================

def _sync(name: str, world: int) -> tuple[bool, str]:
    """After a case: a barrier, and every rank at the same case (the group still works)."""
    dist = _dist()
    try:
        if not dist.is_initialized():
            return False, "the default group is gone"
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=SYNC_S))
        names = [None] * world
        dist.all_gather_object(names, name)
        if any(n != name for n in names):
            return False, f"ranks out of step: {names}"
        return True, ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc)[:160]}"


def _rank_main(rank, world, port, names, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    try:
        dist = _dist()
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        catalogue = {c.name: c for c in cases() + selftest_cases()}
        for name in names:
            case = catalogue[name]
            t0 = time.perf_counter()
            try:
                out = case.fn(rank, world, case) or {}
            except Exception as exc:  # a case's own setup failing: recorded, not lost
                out = {**error_fields(exc, "case", t0), "harness": traceback.format_exc()[-800:]}
            out["case_s"] = time.perf_counter() - t0
            if case.sync:
                out["group_ok"], out["group_why"] = _sync(name, world)
            results.put((rank, name, out))
            if case.sync and not out["group_ok"]:
                break  # the world is out of step: the catalogue starts a fresh one
    except BaseException as exc:
        results.put((rank, "*", {"harness": f"{type(exc).__name__}: {exc}",
                                 "trace": traceback.format_exc()[-800:]}))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)  # no teardown: a gloo destructor may wait on a dead peer


_PORT_LOCK = threading.Lock()
_PORTS_USED: set = set()


def _free_port() -> int:
    """A port no world of this run used yet (spawn.free_port: below the ephemeral range)."""
    from refit_engine.harness.spawn import free_port
    with _PORT_LOCK:
        while True:
            port = free_port()
            if port not in _PORTS_USED:
                _PORTS_USED.add(port)
                return port


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


def _exit_text(code) -> str:
    if code is None:
        return "alive"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_world(ctx, world: int, batch: list[Case]) -> dict:
    """Runs `batch` (cases of one world size) in a world, starting fresh worlds after any case
    that crashed, hung or left the group out of step. Returns {name: raw result}."""
    raw = {}
    pending = list(batch)
    while pending:
        results = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, [c.name for c in pending],
                                                      results), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        got: dict = {}            # name -> {rank: outcome}
        done_ranks: dict = {}     # rank -> number of cases reported
        t_case = time.monotonic()
        stopped_at: dict = {}
        restart = False
        while pending and not restart:
            case = pending[0]
            expected_ranks = [r for r in range(world) if r not in case.dying]
            try:
                rank, name, out = results.get(timeout=0.05)
                if name == "*":
                    got.setdefault(case.name, {})[rank] = {"harness_error": out}
                else:
                    got.setdefault(name, {})[rank] = out
                    done_ranks[rank] = done_ranks.get(rank, 0) + 1
            except queue_mod.Empty:
                pass
            now = time.monotonic()
            mine = got.get(case.name, {})
            if any("harness_error" in o for o in mine.values()):
                raw[case.name] = {"kind": "harness", "per_rank": mine,
                                  "seconds": now - t_case}
                pending.pop(0)
                restart = True
                continue
            if all(r in mine for r in expected_ranks):
                raw[case.name] = {"kind": "done", "per_rank": mine,
                                  "seconds": max([o.get("case_s", 0) for o in mine.values()]
                                                 or [now - t_case])}
                pending.pop(0)
                t_case = now
                if any(o.get("group_ok") is False for o in mine.values()):
                    restart = True
                continue
            if case.resume_after is not None:
                for r, p in enumerate(procs):
                    if p.pid and _stopped(p.pid):
                        first = stopped_at.setdefault(r, now)
                        if now - first >= case.resume_after:
                            os.kill(p.pid, signal.SIGCONT)
                            stopped_at.pop(r, None)
            dead = [(r, p.exitcode) for r, p in enumerate(procs)
                    if r not in case.dying and not p.is_alive() and r not in mine]
            if dead:
                time.sleep(0.2)  # its last words may still be in the queue
                try:
                    while True:
                        rank, name, out = results.get_nowait()
                        if name != "*":
                            got.setdefault(name, {})[rank] = out
                except queue_mod.Empty:
                    pass
                mine = got.get(case.name, {})
                dead = [(r, c) for r, c in dead if r not in mine]
            if dead:
                raw[case.name] = {"kind": "crash", "per_rank": mine, "seconds": now - t_case,
                                  "detail": ", ".join(f"rank {r} {_exit_text(c)}"
                                                      for r, c in dead)}
                pending.pop(0)
                restart = True
            elif now - t_case > case.deadline:
                missing = [r for r in expected_ranks if r not in mine]
                raw[case.name] = {"kind": "hang", "per_rank": mine, "seconds": now - t_case,
                                  "detail": f"deadline {case.deadline:g} s passed; ranks "
                                            f"{missing} still inside"}
                pending.pop(0)
                restart = True
        for p in procs:
            if p.is_alive():
                if not restart:
                    p.join(timeout=2)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=2)
        results.close()
    return raw


# =============================================================================================
# Classification and output
# =============================================================================================

def _describe_error(o: dict) -> str:
    if o.get("refit"):
        return f"RefitError '{o['tensor']}' {o['ranks']} at {o['step']}: {o['reason']}"
    return f"{o.get('error_type')} at {o.get('step')}: {o.get('reason')}"


def classify(case: Case, raw: dict | None) -> dict:
    row = {"case": case.name, "expected": case.expected, "verdict": "", "happened": "",
           "every_rank": "n.a.", "untouched": "n.a.", "seconds": 0.0}
    if case.skip:
        row.update(verdict="skipped", happened=f"skipped: {case.skip}")
        return row
    row["seconds"] = round(raw.get("seconds", 0.0), 2)
    per_rank = raw.get("per_rank", {})
    if raw["kind"] in ("crash", "hang"):
        raised = [o for o in per_rank.values() if o.get("error_type")]
        row.update(verdict=raw["kind"], happened=f"{raw['kind'].upper()}: {raw['detail']}",
                   every_rank="no")
        if raised:
            row["happened"] += f" (others: {_describe_error(raised[0])})"
        return row
    if raw["kind"] == "harness":
        row.update(verdict="failed", happened=f"harness error: {per_rank}", every_rank="no")
        return row
    participants = {r: o for r, o in per_rank.items() if not o.get("exempt")}
    errors = {r: o for r, o in participants.items() if o.get("error_type")}
    refit_errors = {r: o for r, o in errors.items() if o.get("refit")}
    row["every_rank"] = "yes" if participants and len(refit_errors) == len(participants) else "no"
    flags = [o.get("untouched") for o in participants.values() if o.get("untouched") is not None]
    row["untouched"] = ("yes" if all(flags) else "no") if flags else "n.a."
    problems = []
    for r, o in sorted(per_rank.items()):
        for p in o.get("problems", []):
            problems.append(f"rank {r}: {p}")
        if o.get("group_ok") is False:
            problems.append(f"rank {r}: group unusable after the case ({o.get('group_why')})")

    def finish(verdict, text):
        if verdict == "handled" and problems:
            verdict, text = "failed", f"{text}; but {problems[0]}"
        row.update(verdict=verdict, happened=f"{verdict}: {text}")
        return row

    no_error = not errors
    exact = all(o.get("exact") for o in participants.values() if "exact" in o)
    if case.expect in ("ok", "either") and no_error:
        if exact:
            return finish("handled", "refit bit-exact, nothing raised")
        return finish("silent_wrong", "nothing raised, destination not as expected")
    if case.expect == "ok":
        first = next(iter(errors.values()))
        return finish("failed", f"raised on ranks {sorted(errors)}: {_describe_error(first)}")
    # a RefitError expected (or accepted, for "either")
    if no_error:
        changed = row["untouched"] == "no" or not exact
        if changed:
            return finish("silent_wrong", "nothing raised; destination changed / wrong")
        return finish("accepted", "nothing raised (bad input accepted), destination exact")
    if len(refit_errors) != len(errors):
        bad = {r: o for r, o in errors.items() if not o.get("refit")}
        r, o = next(iter(bad.items()))
        return finish("failed", f"rank {r}: {_describe_error(o)}")
    if len(errors) != len(participants):
        quiet = sorted(set(participants) - set(errors))
        r, o = next(iter(errors.items()))
        what = "silent_wrong" if not exact else "failed"
        return finish(what, f"raised on ranks {sorted(errors)} only (not {quiet}): "
                            f"{_describe_error(o)}")
    r, o = next(iter(sorted(refit_errors.items())))
    text = _describe_error(o)
    if row["untouched"] == "no":
        return finish("failed", f"destination changed before the error; {text}")
    if case.same_error and len({(o["tensor"], tuple(o["ranks"]), o["reason"])
                                 for o in refit_errors.values()}) > 1:
        return finish("failed", f"ranks raised different errors; {text}")
    if not o["ranks"]:
        return finish("failed", f"the error names no rank; {text}")
    if case.tensor is not None and o["tensor"] != case.tensor:
        return finish("failed", f"names tensor '{o['tensor']}', expected '{case.tensor}'; {text}")
    if case.ranks is not None and o["ranks"] != case.ranks:
        return finish("failed", f"names ranks {o['ranks']}, expected {case.ranks}; {text}")
    if case.words is not None and case.words.lower() not in o["reason"].lower():
        return finish("failed", f"reason lacks '{case.words}'; {text}")
    if case.timed is not None:
        slow = {r: e["elapsed"] for r, e in refit_errors.items()
                if e["elapsed"] > case.timed + SLACK_S and not e.get("late")}
        if slow:
            r = min(slow)
            return finish("failed", f"rank {r} raised after {slow[r]:.1f} s (timeout_s "
                                    f"{case.timed:g}); {text}")
    return finish("handled", text)


SUMMARY_KEYS = ("handled", "crash", "hang", "silent_wrong", "accepted", "failed", "skipped")


def summarize(rows: list[dict], seconds: float) -> dict:
    count = {k: sum(r["verdict"] == k for r in rows) for k in SUMMARY_KEYS}
    return {"cases": sum(r["verdict"] != "skipped" for r in rows), "handled": count["handled"],
            "crashes": count["crash"], "hangs": count["hang"],
            "silent_wrong": count["silent_wrong"], "accepted": count["accepted"],
            "failed": count["failed"], "skipped": count["skipped"],
            "seconds": round(seconds, 1)}


def format_row(row: dict) -> str:
    happened = row["happened"].replace("\n", " ")
    if len(happened) > 110:
        happened = happened[:107] + "..."
    return (f"{row['case'][:58]:<58} {row['expected']:<11} {happened:<110} "
            f"{row['every_rank']:<5} {row['untouched']:<5} {row['seconds']:>6.2f}")


HEADER = (f"{'case':<58} {'expected':<11} {'what happened':<110} {'every':<5} {'untch':<5} "
          f"{'sec':>6}")


def select(names=None, exact_names=False) -> list[Case]:
    """The catalogue's cases named (exactly, or by case-insensitive substring), in catalogue
    order; the harness's own self-test cases only when named exactly."""
    catalogue = cases()
    if not names:
        return catalogue
    chosen = [c for c in catalogue + selftest_cases() if c.name in names]
    if not exact_names:
        chosen += [c for c in catalogue if c not in chosen
                   and any(n.lower() in c.name.lower() for n in names)]
        order = {c.name: i for i, c in enumerate(catalogue + selftest_cases())}
        chosen.sort(key=lambda c: order[c.name])
    return chosen


# -- the harness's own checks: a crash, a hang and a silent wrong result are classified as
# such, and a shared world carries on after a crash (tests/test_faults.py runs them) -----------

def _selftest_segfault(rank, world, case):
    if rank == 1:
        import ctypes
        ctypes.string_at(0)  # SIGSEGV
    time.sleep(30)


def _selftest_hang(rank, world, case):
    time.sleep(30)


SELFTEST = ("selftest: segfault", "selftest: after a crash, same world", "selftest: hang",
            "selftest: wrong result", "selftest: wrong exception")


def selftest_cases() -> list[Case]:
    return [
        Case(SELFTEST[0], _selftest_segfault, expect="ok", share="selftest", deadline=20),
        Case(SELFTEST[1], lambda r, w, c: {"exact": True}, expect="ok", share="selftest"),
        Case(SELFTEST[2], _selftest_hang, expect="ok", deadline=2),
        Case(SELFTEST[3], lambda r, w, c: {"exact": r == 0}, expect="ok"),
        Case(SELFTEST[4], lambda r, w, c: run_refit(lambda: _pair(r, w),
                                                     plan_kw=dict(no_such_option=1))),
    ]


def _context(chosen, method):
    # The catalogue is about CPU/gloo: its worlds see no GPU, as on CI. (On a GPU machine a
    # forkserver whose preloads touched CUDA cannot fork ranks that use it.)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    ctx = mp.get_context(method)
    if method == "forkserver":
        preload = ["torch", "torch.distributed", "numpy", "refit_engine",
                   "refit_engine.executors.cpu", "refit_engine.megatron"]
        if any(c.needs == "megatron" and not c.skip for c in chosen):
            preload.append("refit_engine.harness.models.megatron_builder")
        ctx.set_forkserver_preload(preload)
    return ctx


def run_catalogue(names=None, jobs: int = 2, method: str = "forkserver", echo=None,
                  exact_names: bool = False) -> tuple:
    """Runs the chosen cases (all by default); returns (rows in catalogue order, summary)."""
    t0 = time.monotonic()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # gloo's timeout warnings: expected
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")  # megatron without TE
    chosen = select(names, exact_names)
    ctx = _context(chosen, method)
    batches: list[tuple[int, list[Case]]] = []
    shared: dict = {}
    for c in chosen:
        if c.skip:
            continue
        if c.share:
            key = (c.share, c.world)
            if key not in shared:
                shared[key] = []
                batches.append((c.world, shared[key]))
            shared[key].append(c)
        else:
            batches.append((c.world, [c]))
    # longest first: the shared worlds and the cases that wait on absent ranks
    batches.sort(key=lambda b: -sum(c.deadline if c.timed or c.dying or c.resume_after
                                    else 1 for c in b[1]) - 20 * (len(b[1]) > 1))
    raw: dict = {}
    lock = threading.Lock()
    work = list(batches)

    def worker():
        while True:
            with lock:
                if not work:
                    return
                world, batch = work.pop(0)
            got = run_world(ctx, world, batch)
            with lock:
                raw.update(got)
                if echo:
                    for c in batch:
                        if c.name in got:
                            echo(format_row(classify(c, got[c.name])))
    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = []
    for c in chosen:
        rows.append(classify(c, raw.get(c.name)) if not c.skip else classify(c, None))
        if c.name in raw:
            rows[-1]["raw"] = raw[c.name]
    return rows, summarize(rows, time.monotonic() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these cases (exact names or case-insensitive substrings)")
    parser.add_argument("--json", metavar="PATH", help="write every row as JSON to PATH")
    parser.add_argument("--jobs", type=int, default=2, help="worlds run at once (default 2)")
    parser.add_argument("--start-method", default="forkserver", choices=("forkserver", "spawn"))
    parser.add_argument("--progress", action="store_true",
                        help="print rows as cases finish (stderr), before the ordered table")
    args = parser.parse_args(argv)
    chosen = select(args.only)
    if args.list:
        for c in chosen:
            where = "own world" if not c.share else f"shared world '{c.share}'"
            print(f"{c.name:<58} {c.expected:<11} world {c.world}, {where}"
                  + (f" (skip: {c.skip})" if c.skip else ""))
        return 0
    if not chosen:
        print(f"no case matches {args.only}", file=sys.stderr)
        return 2
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None
    rows, summary = run_catalogue(args.only, args.jobs, args.start_method, echo)
    print(HEADER)
    for row in rows:
        print(format_row(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [{k: v for k, v in r.items() if k != "raw"} | {"raw": r.get("raw")}
                                for r in rows], "summary": summary}, f, indent=1, default=str)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
