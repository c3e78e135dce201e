"""The per-pair choice of transport (peers.py), and plan()'s transport options, on CPU."""

import numpy as np
import pytest

from refit_engine.errors import RefitError
from refit_engine.executors.ipc import without_peers
from refit_engine.peers import DeviceId, choose_transports, this_device
from refit_engine.tables import MSG, SEG

torch = pytest.importorskip("torch")


def _devices(layout):
    """rank -> DeviceId from [(host, gpu), ...] in rank order."""
    return {r: DeviceId(host, gpu, i) for r, (host, gpu, i) in enumerate(layout)}


ONE_NODE = _devices([("a", f"GPU-{i}", i) for i in range(4)])
ONE_GPU = _devices([("a", "GPU-0", 0)] * 4)
TWO_NODES = _devices([("a", "GPU-0", 0), ("a", "GPU-1", 1), ("b", "GPU-2", 0), ("b", "GPU-3", 1)])


def test_auto_is_ipc_within_a_node_and_nccl_across():
    assert choose_transports(0, ONE_NODE, "auto") == {1: "ipc", 2: "ipc", 3: "ipc"}
    assert choose_transports(1, TWO_NODES, "auto") == {0: "ipc", 2: "nccl", 3: "nccl"}
    assert choose_transports(2, TWO_NODES, "auto") == {0: "nccl", 1: "nccl", 3: "ipc"}


def test_several_ranks_on_one_gpu_go_over_ipc():
    assert set(choose_transports(3, ONE_GPU, "auto").values()) == {"ipc"}
    assert set(choose_transports(3, ONE_GPU, "ipc").values()) == {"ipc"}


def test_forced_transports():
    assert set(choose_transports(0, TWO_NODES, "nccl").values()) == {"nccl"}
    assert set(choose_transports(0, ONE_NODE, "ipc").values()) == {"ipc"}


@pytest.mark.parametrize("devices, transport, words", [
    (ONE_GPU, "nccl", ["share one GPU", "ranks [0, 1, 2, 3]"]),
    (TWO_NODES, "ipc", ["2 nodes", "rank 0 on a", "rank 2 on b"]),
    (_devices([("a", "G", 0), ("a", "G", 0), ("b", "H", 0)]), "auto", ["share one GPU on a"]),
    (ONE_NODE, "shm", ["transport must be one of"]),
])
def test_impossible_choices_are_refused_the_same_on_every_rank(devices, transport, words):
    messages = set()
    for rank in devices:
        with pytest.raises(RefitError) as err:
            choose_transports(rank, devices, transport)
        messages.add(str(err.value))
        for w in words:
            assert w in str(err.value)
    assert len(messages) == 1


def test_this_device_on_cpu_names_the_host(monkeypatch):
    monkeypatch.setenv("REFIT_ENGINE_HOST", "node-17")
    d = this_device("cpu")
    assert d.host == "node-17" and d.gpu == "" and d.index == -1


def _plan_with(peers_of_segments, buckets):
    """A RankPlan-like object with one send segment and one send message per (peer, bucket)."""
    from refit_engine.compiler import RankPlan
    from refit_engine.tables import MESSAGE_FIELDS, SEGMENT_FIELDS

    seg = np.zeros((len(peers_of_segments), len(SEGMENT_FIELDS)), dtype=np.int64)
    msg = np.zeros((len(peers_of_segments), len(MESSAGE_FIELDS)), dtype=np.int64)
    offsets = {}
    for i, (peer, bucket) in enumerate(zip(peers_of_segments, buckets)):
        seg[i, SEG["peer"]], seg[i, SEG["bucket"]] = peer, bucket
        seg[i, SEG["rows"]], seg[i, SEG["row_bytes"]] = 1, 100
        msg[i, MSG["peer"]], msg[i, MSG["bucket"]], msg[i, MSG["bytes"]] = peer, bucket, 100
        msg[i, MSG["offset"]] = seg[i, SEG["dst_offset"]] = offsets.get(bucket, 0)
        offsets[bucket] = offsets.get(bucket, 0) + 100
    empty = np.zeros((0, len(SEGMENT_FIELDS)), dtype=np.int64)
    staging = [offsets.get(b, 0) for b in range(max(buckets) + 1)]
    return RankPlan(0, empty, seg, empty, msg, msg[:0], staging, [0] * len(staging),
                    len(staging))


def test_ipc_peers_leave_the_nccl_plan_with_its_staging():
    plan = _plan_with([1, 2, 1, 3], [0, 0, 1, 1])
    nccl = without_peers(plan, {1})
    assert sorted(nccl.send[:, SEG["peer"]].tolist()) == [2, 3]
    assert sorted(nccl.send_messages[:, MSG["peer"]].tolist()) == [2, 3]
    # Peer 2's message moves from offset 100 of bucket 0 to 0 (peer 1's went to IPC), its
    # staged segment with it: staging holds only what NCCL carries.
    assert nccl.send_staging_bytes == [100, 100]
    assert nccl.send_messages[:, MSG["offset"]].tolist() == [0, 0]
    assert nccl.send[:, SEG["dst_offset"]].tolist() == [0, 0]
    everything = without_peers(plan, {1, 2, 3})
    assert len(everything.send) == 0 and everything.send_staging_bytes == [0, 0]
    assert without_peers(plan, set()) is plan


def _cpu_plan(rank, world, **options):
    import refit_engine
    from refit_engine.local import ShardedTensors

    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w", torch.arange(8, dtype=torch.float32), (8,))
    dst.add("w", torch.zeros(8, dtype=torch.float32), (8,))
    try:
        plan = refit_engine.plan(src, dst, timeout_s=30, **options)
    except RefitError as exc:
        return str(exc)
    refit_engine.execute(plan)
    return plan.peer_transports, plan.traffic["bytes_ipc"], plan.traffic["staging_bytes"]


def test_plan_options_on_cpu():
    """Bad transport options are refused on every rank; a CPU plan's peers are gloo's."""
    from multiproc import run_world

    for rank_results in run_world(_run_cases, 2, timeout=180):
        for got, words in rank_results:
            assert isinstance(got, str) and words in got, got


def _run_cases(rank, world):
    cases = (({"transport": "ipc"}, "for CUDA tensors"),
             ({"transport": "tcp"}, "transport must be one of"),
             ({"ipc_sync": "never"}, "ipc_sync must be one of"))
    out = [(_cpu_plan(rank, world, **options), words) for options, words in cases]
    transports, bytes_ipc, staging = _cpu_plan(rank, world)
    assert set(transports.values()) <= {"gloo"} and bytes_ipc == 0 and staging == 0
    return out
