"""Every wait of a plan is bounded and poisons only the plan's own channel: late, stopped and
absent ranks, plans run in different orders, two threads, out-of-range options."""

import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

import refit_engine
from refit_engine import RefitError, ShardedTensors, Split
from refit_engine.verify import check_exact

from multiproc import run_world

TIMEOUT = 3.0
SLACK = 6.0  # process start-up and a loaded 2-core machine


def _models(rank, seed=0, poison=0xA5):
    """TP2 -> TP1 of one (8, 4) tensor on ranks 0 and 1, fresh random source."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(8, 4, generator=g)
    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w", full.chunk(2, 0)[rank].clone(), (8, 4), Split(0, 2), rank)
    target = torch.empty(8, 4)
    target.view(torch.uint8).fill_(poison)
    dst.add("w", target, (8, 4))
    return src, dst


def _after_failure_all_is_usable(rank, seed):
    """The caller's group still works and a new plan refits bit-exactly."""
    dist.barrier()
    src, dst = _models(rank, seed)
    plan = refit_engine.plan(src, dst, timeout_s=30)
    refit_engine.execute(plan)
    return check_exact(plan)


def _late_planner(rank, world):
    if rank == 1:
        time.sleep(TIMEOUT + 1.0)
    src, dst = _models(rank)
    t0 = time.monotonic()
    try:
        refit_engine.plan(src, dst, timeout_s=TIMEOUT)
        outcome = "no error"
    except RefitError as exc:
        outcome = (exc.ranks, exc.reason)
    return outcome, time.monotonic() - t0, _after_failure_all_is_usable(rank, 1)


def test_late_rank_in_plan_raises_within_timeout_and_groups_stay_usable():
    (first, took, wrong0), (second, _, wrong1) = run_world(_late_planner, 2)
    assert first != "no error" and 1 in first[0] and "has not arrived" in first[1], first
    assert took < TIMEOUT + SLACK
    assert second != "no error", second  # the late rank finds nobody left to plan with
    assert wrong0 == wrong1 == []


def _absent_executor(rank, world, stop):
    src, dst = _models(rank)
    plan = refit_engine.plan(src, dst, timeout_s=TIMEOUT)
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    outcome, took = "skipped", 0.0
    if rank == 1 and stop:
        os.kill(os.getpid(), signal.SIGSTOP)  # resumed by rank 0 after it gave up
    if rank == 0 or stop:
        t0 = time.monotonic()
        try:
            refit_engine.execute(plan)
            outcome = "no error"
        except RefitError as exc:
            outcome = (exc.ranks, exc.reason, plan.broken is not None)
        took = time.monotonic() - t0
        if rank == 0 and stop:
            os.kill(pids[1], signal.SIGCONT)
    return outcome, took, dst.tensors["w"].view(torch.uint8).eq(0xA5).all().item() or rank, \
        _after_failure_all_is_usable(rank, 2)


@pytest.mark.parametrize("stop", [False, True], ids=["never-executes", "stopped"])
def test_absent_or_stopped_rank_in_execute(stop):
    results = run_world(_absent_executor, 2, stop)
    outcome, took, _, wrong = results[0]
    assert outcome != "no error" and 1 in outcome[0] and outcome[2], outcome
    assert "rank 1" in outcome[1] and "refit 1 check" in outcome[1]
    assert took < TIMEOUT + SLACK
    if stop:  # the stopped rank, resumed, finds its peer gone: raises too
        assert results[1][0] != "no error" and results[1][0][2]
    assert all(r[3] == [] for r in results)


def _crossed_plans(rank, world, verify):
    a = _models(rank, seed=3)
    b = _models(rank, seed=4)
    plans = [refit_engine.plan(*a, timeout_s=TIMEOUT), refit_engine.plan(*b, timeout_s=TIMEOUT)]
    order = plans if rank == 0 else plans[::-1]
    outcomes = []
    for p in order:
        try:
            refit_engine.execute(p, verify=verify)
            outcomes.append("no error")
        except RefitError as exc:
            outcomes.append(exc.reason)
    return outcomes, _after_failure_all_is_usable(rank, 5)


@pytest.mark.parametrize("verify", [False, True])
def test_plans_executed_in_different_orders_raise(verify):
    for outcomes, wrong in run_world(_crossed_plans, 2, verify):
        assert "no error" not in outcomes, outcomes
        assert wrong == []


def _two_threads(rank, world):
    src, dst = _models(rank)
    plan = refit_engine.plan(src, dst, timeout_s=TIMEOUT)
    # Another thread mid-refit (holding the plan) on rank 0: a second call is refused at once.
    refused = None
    if rank == 0:
        with plan.lock:
            try:
                refit_engine.execute(plan)
            except RefitError as exc:
                refused = exc.reason
    dist.barrier()
    refit_engine.execute(plan)  # the plan is still good
    first = check_exact(plan)
    # Two real threads at once on rank 0 (one call on rank 1): one refits, the other is
    # refused or times out; never a silent wrong result.
    outcomes = []
    if rank == 0:
        def call():
            try:
                refit_engine.execute(plan)
                outcomes.append("ok")
            except RefitError as exc:
                outcomes.append(exc.reason)
        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        try:
            refit_engine.execute(plan)
        except RefitError:
            pass
    return refused, first, outcomes


def _close_during_refit(rank, world):
    """Rank 0 closes its plan from another thread while a (slowed) refit runs on it: close
    returns at once and the plan is unusable, but the refit ends bit-exact and only then are
    the plan's resources released."""
    import threading
    import time
    src, dst = _models(rank)
    plan = refit_engine.plan(src, dst, timeout_s=30)
    real, events = plan.executor.run, []
    real_close = plan.executor.close

    def slow_run(*args, **kwargs):
        started.set()
        time.sleep(1.0)
        real(*args, **kwargs)
        events.append("refit ended")

    def recording_close():
        events.append("released")
        real_close()
    started = threading.Event()
    plan.executor.run, plan.executor.close = slow_run, recording_close
    closer = None
    if rank == 0:
        def close():
            started.wait(30)
            plan.close()  # returns while the refit still sleeps: see the events' order
            events.append("close returned")
        closer = threading.Thread(target=close)
        closer.start()
    refit_engine.execute(plan)
    if closer is not None:
        closer.join(30)
    full = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    exact = torch.equal(dst.tensors["w"], full)
    refused = None
    if rank == 0:
        try:
            refit_engine.execute(plan)
        except RefitError as exc:
            refused = exc.reason
    return events, exact, plan.broken, refused


def test_close_during_a_refit_in_another_thread_releases_after_it():
    (events, exact, broken, refused), (_, exact1, _, _) = run_world(_close_during_refit, 2)
    assert events == ["close returned", "refit ended", "released"], events
    assert exact and exact1 and broken == "closed"
    assert refused and "unusable" in refused and "closed" in refused, refused


def test_two_threads_on_one_plan():
    (refused, first, outcomes), (_, first1, _) = run_world(_two_threads, 2)
    assert refused and "another thread" in refused
    assert first == first1 == []
    assert len(outcomes) == 2 and outcomes.count("ok") == 1, outcomes


BAD_OPTIONS = [
    dict(timeout_s=-1), dict(timeout_s=0), dict(timeout_s=float("nan")), dict(timeout_s=True),
    dict(timeout_s=float("inf")), dict(timeout_s="5"), dict(bucket_bytes=0),
    dict(bucket_bytes=-4), dict(bucket_bytes=1.5), dict(bucket_bytes=1 << 70),
    dict(threads=0), dict(threads=2.0), dict(mode="both"), dict(ranks_per_node=-1),
    dict(ranks_per_node=1 << 70),
]


def _bad_options(rank, world):
    out = []
    for options in BAD_OPTIONS:
        src, dst = _models(rank)
        try:
            refit_engine.plan(src, dst, **options)
            out.append("no error")
        except RefitError as exc:
            out.append((exc.ranks, exc.reason, bool(dst.tensors["w"].view(torch.uint8).eq(0xA5).all())))
        except Exception as exc:  # the defect this test is about
            out.append(f"{type(exc).__name__}: {exc}")
    src, dst = _models(rank)
    plan = refit_engine.plan(src, dst)
    for options in (dict(graph=1), dict(sync="yes"), dict(verify=True, sync=False)):
        try:
            refit_engine.execute(plan, **options)
            out.append("no error")
        except RefitError as exc:
            out.append((exc.ranks, exc.reason, True))
    return out


def test_out_of_range_options_raise_refit_error_on_every_rank():
    for per_rank in run_world(_bad_options, 2):
        for options, outcome in zip(BAD_OPTIONS + ["graph", "sync", "verify"], per_rank):
            assert isinstance(outcome, tuple), (options, outcome)
            assert outcome[2], (options, "destination touched")


def _split_options(rank, world):
    src, dst = _models(rank)
    plan = refit_engine.plan(src, dst, timeout_s=30)
    outcomes = []
    for options in (dict(verify=rank == 0), dict(graph=False, sync=rank == 1)):
        try:
            refit_engine.execute(plan, **options)
            outcomes.append("no error")
        except RefitError as exc:
            outcomes.append((exc.ranks, exc.reason))
        src, dst = _models(rank)
        plan = refit_engine.plan(src, dst, timeout_s=30)
    untouched = bool(dst.tensors["w"].view(torch.uint8).eq(0xA5).all())
    return outcomes, untouched


def test_ranks_passing_different_execute_options_raise_on_every_rank():
    for outcomes, untouched in run_world(_split_options, 2):
        assert all(o != "no error" and o[0] == [0, 1] and "disagree" in o[1] for o in outcomes), \
            outcomes
        assert untouched


def _interrupted(rank, world):
    src, dst = _models(rank)
    plan = refit_engine.plan(src, dst, timeout_s=TIMEOUT)
    if rank == 0:
        def interrupt(*_):
            raise KeyboardInterrupt
        plan.executor.run = interrupt
    try:
        refit_engine.execute(plan)
        return "no error", plan.broken is not None
    except KeyboardInterrupt:
        return "interrupted", plan.broken is not None
    except RefitError as exc:
        return exc.reason, plan.broken is not None


def test_interrupted_refit_leaves_plan_unusable():
    (first, broken0), (second, broken1) = run_world(_interrupted, 2)
    assert first == "interrupted" and broken0
    assert second != "no error" and broken1


def test_destroyed_group_is_refused():
    for outcome in run_world(_destroyed_group, 2):
        assert "not a live process group" in outcome, outcome


def _destroyed_group(rank, world):
    group = dist.new_group([0, 1])
    dist.destroy_process_group(group)
    src, dst = _models(rank)
    try:
        refit_engine.plan(src, dst, group=group)
        return "no error"
    except RefitError as exc:
        return exc.reason


def _modes_differ(rank, world):
    src, dst = _models(rank)
    try:
        refit_engine.plan(src, dst, mode="collocated" if rank == 0 else "auto", timeout_s=30)
        return "no error"
    except RefitError as exc:
        return exc.ranks, exc.reason


def test_ranks_passing_different_plan_options_get_one_error():
    first, second = run_world(_modes_differ, 2)
    assert first == second and first[0] == [0, 1] and "disagree on plan()'s options" in first[1]


def _dead_between_refits(rank, world):
    g = torch.Generator().manual_seed(7)
    full = torch.randn(6, 4, generator=g)
    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w", full.chunk(3, 0)[rank].clone(), (6, 4), Split(0, 3), rank)
    dst.add("w", torch.zeros(6, 4), (6, 4))
    plan = refit_engine.plan(src, dst, timeout_s=20)
    refit_engine.execute(plan)
    dist.barrier()
    if rank == 2:
        os._exit(0)
    t0 = time.monotonic()
    try:
        refit_engine.execute(plan)
        return "no error", 0.0
    except RefitError as exc:
        return (exc.ranks, exc.reason), time.monotonic() - t0


def test_dead_rank_between_refits_is_named_quickly():
    for outcome, took in run_world(_dead_between_refits, 3, dying={2})[:2]:
        assert outcome != "no error", outcome
        ranks, reason = outcome
        assert 2 in ranks and "rank 2" in reason, outcome
        assert "rank 0 " not in reason and "rank 1 " not in reason, reason  # the living
        assert took < 20, took  # a reset connection, not the timeout


def _named_plans_in_crossed_order(rank, world):
    a, b = _models(rank, seed=8), _models(rank, seed=9)
    order = [("rollout", a), ("reference", b)]
    if rank == 1:
        order.reverse()
    outcomes = []
    for name, (src, dst) in order:
        try:
            refit_engine.plan(src, dst, timeout_s=TIMEOUT, name=name)
            outcomes.append("planned")
        except RefitError as exc:
            outcomes.append(exc.reason)
    return outcomes


def test_named_plans_built_in_crossed_order_never_pair():
    # Unnamed, the two ranks' first plans would pair (same names and shapes): a cross-wired
    # plan. Named, each waits for its own partner and the mismatch raises. Rank 0 builds
    # "rollout" then "reference", rank 1 the reverse: the rank whose first plan times out first
    # may start its second while the other's first still waits, and those two have the same
    # name, so they may pair (correctly). What must never happen: the two first plans (different
    # names) pairing, or a plan planned on one rank only.
    ranks = run_world(_named_plans_in_crossed_order, 2)
    (first0, second0), (first1, second1) = ([o == "planned" for o in r] for r in ranks)
    assert not (first0 and first1), ranks
    assert first0 == second1 and first1 == second0, ranks  # "rollout", "reference" pairs


def test_close_releases_the_group_when_the_executor_fails_to_release():
    import threading
    import types

    from refit_engine.refit import Plan

    released = []

    def failing():
        raise RuntimeError("the executor cannot be released")
    fake = types.SimpleNamespace(lock=threading.Lock(), broken=None, close_pending=False,
                                 executor=types.SimpleNamespace(close=failing),
                                 channel=types.SimpleNamespace(close=lambda: released.append(1)))
    with pytest.raises(RuntimeError, match="cannot be released"):
        Plan.close(fake)
    assert released == [1] and fake.broken == "closed" and not fake.lock.locked()
