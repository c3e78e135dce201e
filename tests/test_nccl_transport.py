"""The NCCL transport's deadlines (csrc/transport/nccl, refit_engine.executors.cuda.nccl_communicator).

The communicator is non-blocking, so creating it and ending a send/recv group never wait inside
NCCL past the plan's timeout. On one GPU: a one-rank communicator's send to itself, run, graph
captured and replayed (its first group end connects the pair: the in-progress path); a
communicator whose other rank never joins, from either side; and two rank processes where one
fails to create its communicator, so the other times out inside NCCL and both raise the same
RefitError naming the failed rank. On CPU the same two-rank report with NCCL faked.
"""

from __future__ import annotations

import os
import sys
import time
import types

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_check  # noqa: E402
from multiproc import run_world  # noqa: E402

from refit_engine import _core  # noqa: E402

_NO_NCCL = gpu_check.skip_reason() or (
    None if getattr(_core, "HAS_NCCL", False) else "refit_engine was built without nccl.h")


def needs_nccl(test):
    """A GPU test that creates NCCL communicators (skipped, with the reason, where it cannot)."""
    return pytest.mark.gpu(pytest.mark.skipif(_NO_NCCL is not None, reason=_NO_NCCL or "")(test))


@pytest.mark.parametrize("graph", [False, True], ids=["run", "graph"])
@needs_nccl
def test_one_rank_communicator_sends_to_itself(graph):
    comm = _core.NcclCommunicator(_core.NcclCommunicator.unique_id(), 1, 0, 0, 30.0)
    assert (comm.rank, comm.size, comm.timeout_s) == (0, 1, 30.0)
    executor = _core.CudaExecutor(0, comm)
    nbytes = 3 << 20
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda:0")
    dst = torch.full((nbytes,), 0xA5, dtype=torch.uint8, device="cuda:0")
    message = np.array([[0, 0, nbytes]], dtype=np.int64)
    sends, recvs = message.copy(), message.copy()
    sends[0, 1], recvs[0, 1] = src.data_ptr(), dst.data_ptr()
    executor.add_bucket(None, sends, recvs, None, None)
    stream = torch.cuda.current_stream(0).cuda_stream
    for attempt in range(3):  # the first connects the pair; a graph is captured, then replayed
        dst.fill_(0xA5)
        src.random_(0, 256)
        if graph and executor.captured:
            executor.replay(stream)
        elif graph:
            executor.capture(stream)
        else:
            executor.run(stream)
        executor.wait(stream, 30.0)
        assert torch.equal(dst, src), f"attempt {attempt}: received bytes differ from those sent"
    assert executor.captured == graph


@pytest.mark.parametrize("rank", [0, 1], ids=["root-waits", "peer-waits"])
@needs_nccl
def test_a_rank_that_never_joins_times_out(rank):
    uid = _core.NcclCommunicator.unique_id()  # its bootstrap root listens in this process
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"creating the communicator \(rank {rank} of 2\) "
                                           r"within 2 s: a peer never joined"):
        _core.NcclCommunicator(uid, 2, rank, 0, 2.0)
    assert time.monotonic() - started < 2.0 + 10, "the deadline was not kept"
    # The process's NCCL is still usable: a new communicator works.
    assert _core.NcclCommunicator(_core.NcclCommunicator.unique_id(), 1, 0, 0, 30.0).size == 1


def _one_rank_fails_to_join(rank, world, fake):
    from refit_engine import RefitError
    from refit_engine.channel import Channel
    from refit_engine.executors import cuda as cuda_executors

    real = getattr(cuda_executors._core, "NcclCommunicator", None)  # absent without CUDA

    class FailsOnLastRank:
        """Rank world-1 fails at once (as a CUDA or NCCL error would); the others go on into
        NCCL (real or, `fake`, a stand-in that waits out its deadline), waiting for it."""

        unique_id = staticmethod(lambda: real.unique_id() if not fake else b"x" * 128)

        def __init__(self, uid, nranks, index, device, timeout_s):
            if index == nranks - 1:
                raise RuntimeError("injected: this rank's NCCL could not start")
            if not fake:
                self.comm = real(uid, nranks, index, device, timeout_s)
                return
            time.sleep(timeout_s)
            raise RuntimeError(f"NCCL did not finish creating the communicator (rank {index} of "
                               f"{nranks}) within {timeout_s} s: a peer never joined")

    cuda_executors._core = types.SimpleNamespace(NcclCommunicator=FailsOnLastRank)
    channel = Channel(None, timeout_s=6.0, what="nccl-init-test")
    started = time.monotonic()
    with pytest.raises(RefitError) as raised:
        cuda_executors.nccl_communicator(channel, 0)
    elapsed = time.monotonic() - started
    # Usable afterwards: the plan's channel still gathers.
    assert channel.gather(rank, "after") == list(range(world))
    return str(raised.value), raised.value.ranks, elapsed


def _check_reports(results, world):
    messages = {m for m, _, _ in results}
    assert len(messages) == 1, f"ranks raised different errors: {messages}"
    message = messages.pop()
    assert f"failed on ranks {list(range(world))}" in message, message
    assert f"rank {world - 1}: RuntimeError: injected" in message, message
    assert "did not finish" not in message, "a consequence was reported as the cause: " + message
    for _, ranks, elapsed in results:
        assert ranks == [world - 1]
        assert elapsed < 6.0 + 10, "waited past the channel's deadline"


def test_failed_rank_is_named_on_every_rank_cpu():
    _check_reports(run_world(_one_rank_fails_to_join, 3, True, timeout=120), 3)


@needs_nccl
def test_failed_rank_is_named_on_every_rank_real_nccl():
    """Rank 0 creates a real two-rank communicator on the one GPU; rank 1 fails before NCCL:
    rank 0 waits out NCCL's deadline, then both report rank 1's failure."""
    _check_reports(run_world(_one_rank_fails_to_join, 2, False, timeout=120), 2)
