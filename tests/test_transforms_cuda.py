"""Transforms inside the refit on the GPU (issue 16): casts, fp8_block128 and mxfp8 written by
the CUDA executors, bit for bit as refit_engine.quantize defines them.

- every rank in one process (LoopbackRefit): the staged path (pack, exchange, unpack: the
  NCCL executor's data path) and the direct path, plain and captured as a CUDA graph and
  replayed with new source values;
- rank processes sharing cuda:0 through plan() / execute() (CUDA IPC: the transform rows
  read the peers' sources in place), collocated and not, TP changes, experts and pipeline
  layers changing ranks (EP / PP), fused and assembled destinations, graph replays; every
  destination and scale poisoned before every run.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpu_check
from multiproc import run_world

import refit_engine
from refit_engine import quantize
from refit_engine.layouts import Layout, Split
from refit_engine.local import ShardedTensors
from refit_engine.transforms import TensorFormat, scale_shape

POISON = 0xA5

pytestmark = gpu_check.MARKS

# (name, global shape, source dtype, split dim, destination format): row splits of 384 rows
# give 128-row shards at TP3 and 192-row source shards at TP2 (a 128-row block cut between
# two sources: assembled); column splits exercise the rectangles' pitches.
TENSORS = [
    ("q.weight", (768, 384), "bfloat16", 0, "fp8_block128"),
    ("o.weight", (384, 768), "bfloat16", 1, "fp8_block128"),
    ("up.weight", (384, 256), "bfloat16", 0, "fp8_block128"),
    ("mx.weight", (96, 384), "bfloat16", 1, "mxfp8"),
    ("bias32", (64, 96), "float32", 1, "bf16"),
    ("norm", (96, 64), "bfloat16", 0, "fp32"),
]


def _global(name, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return x.to(getattr(torch, dtype))


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    out = t.view(width).numpy()
    return out.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[t.element_size()])


def _fmt_name(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dtype]


def _expected(name, shape, dtype, dim, fmt, parts, part, seed):
    """(data bits, scale bits or None) of part `part` of `parts` of the tensor."""
    whole = _bits(_global(name, shape, dtype, seed))
    n = shape[dim] // parts
    box = [slice(None), slice(None)]
    box[dim] = slice(part * n, (part + 1) * n)
    q, s = quantize.transform(np.ascontiguousarray(whole[tuple(box)]), _fmt_name(dtype), fmt)
    return q, (None if s is None else np.ascontiguousarray(s).view(np.uint8).reshape(-1))


def _dst_tensor(shape, fmt):
    if fmt in quantize.QUANTIZED:
        t = torch.full(shape, POISON, dtype=torch.uint8, device="cuda:0")
        return t.view(torch.float8_e4m3fn)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[fmt]
    return torch.full(shape, 7.0, dtype=dtype, device="cuda:0")


def _poison(dst: ShardedTensors):
    for t in list(dst.tensors.values()) + list(dst.scales.values()):
        t.view(torch.uint8).fill_(POISON)


def _check(dst: ShardedTensors, parts, part, seed):
    wrong = []
    for name, shape, dtype, dim, fmt in TENSORS:
        q, s = _expected(name, shape, dtype, dim, fmt, parts, part, seed)
        if not np.array_equal(_bits(dst.tensors[name]), q):
            wrong.append(name)
        if s is not None and not np.array_equal(
                _bits(dst.scales[name].view(torch.uint8)).reshape(-1), s):
            wrong.append(name + " scale")
    return wrong


# -- every rank in one process -----------------------------------------------------------------

def _loopback_case(src_tp, dst_tp, direct, graph):
    from refit_engine.executors.loopback import LoopbackRefit
    src, carrier = Layout(), Layout()
    formats, src_tensors, dst_tensors, scales = {}, {}, {}, {}
    for name, shape, dtype, dim, fmt in TENSORS:
        src.place(name, shape, dtype, [(r, r) for r in range(src_tp)], Split(dim, src_tp))
        carrier.place(name, shape, dtype, [(r, r) for r in range(dst_tp)], Split(dim, dst_tp))
        formats[name] = TensorFormat(_fmt_name(dtype), fmt)
    for index, meta in enumerate(src.buffers):
        src_tensors[(meta.rank, meta.key)] = torch.empty(meta.shape, dtype=getattr(
            torch, meta.dtype), device="cuda:0")
    for meta in carrier.buffers:
        fmt = formats[meta.key].dst
        dst_tensors[(meta.rank, meta.key)] = _dst_tensor(meta.shape, fmt)
        if fmt in quantize.QUANTIZED:
            dtype = torch.float32 if fmt == "fp8_block128" else torch.uint8
            scales[(meta.rank, meta.key)] = torch.empty(scale_shape(meta.shape, fmt),
                                                        dtype=dtype, device="cuda:0")
    refit = LoopbackRefit(src, carrier, src_tensors, dst_tensors, bucket_bytes=1 << 16,
                          direct=direct, formats=formats, scales=scales)
    for seed in range(3):
        for (rank, key), t in src_tensors.items():
            name, shape, dtype, dim, _ = next(x for x in TENSORS if x[0] == key)
            n = shape[dim] // src_tp
            t.copy_(_global(name, shape, dtype, seed).narrow(dim, rank * n, n))
        for t in list(dst_tensors.values()) + list(scales.values()):
            t.view(torch.uint8).fill_(POISON)
        refit.run(graph=graph)
        torch.cuda.synchronize()
        for rank in range(dst_tp):
            local = ShardedTensors(tensors={k: t for (r, k), t in dst_tensors.items() if r == rank},
                                   scales={k: t for (r, k), t in scales.items() if r == rank})
            assert _check(local, dst_tp, rank, seed) == [], (src_tp, dst_tp, direct, graph, seed)


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 3), (3, 1), (2, 3)])
def test_loopback_transforms_bit_exact(src_tp, dst_tp, direct):
    _loopback_case(src_tp, dst_tp, direct, graph=False)


@pytest.mark.parametrize("direct", [False, True])
def test_loopback_transforms_graph_replays(direct):
    _loopback_case(2, 1, direct, graph=True)


# -- rank processes sharing cuda:0 (CUDA IPC) -----------------------------------------------

def _moving(src_tp, dst_tp, separate):
    """(name, shape, format, source rank, destination rank) of whole tensors that change hands:
    experts spread over the source ranks (EP) and gathered on fewer or other destination ranks,
    and layers of a pipeline stage each (PP) ending on another rank."""
    dst_first = src_tp if separate else 0
    out = []
    for e in range(4):  # EP: expert e on source rank e % src_tp, destination rank e % dst_tp
        out.append((f"experts.{e}.fc1.weight", (256, 128), "fp8_block128", e % src_tp,
                    dst_first + e % dst_tp))
    for layer in range(2):  # PP: layer l on source rank l % src_tp, the last destination rank
        out.append((f"layers.{layer}.proj.weight", (128, 200), "mxfp8", layer % src_tp,
                    dst_first + dst_tp - 1 - layer % dst_tp))
    return out


def _ipc_worker(rank, world, src_tp, dst_tp, separate, ipc_sync):
    torch.cuda.set_device(0)
    src_ranks = range(src_tp)
    dst_ranks = range(src_tp, src_tp + dst_tp) if separate else range(dst_tp)
    src, dst = ShardedTensors(), ShardedTensors()
    for name, shape, dtype, dim, fmt in TENSORS:
        if rank in src_ranks:
            n = shape[dim] // src_tp
            part = rank
            t = _global(name, shape, dtype, 0).narrow(dim, part * n, n).contiguous().cuda()
            src.add(name, t, shape, Split(dim, src_tp), part)
        if rank in dst_ranks:
            part = list(dst_ranks).index(rank)
            local = list(shape)
            local[dim] //= dst_tp
            dst.add(name, _dst_tensor(tuple(local), fmt), shape, Split(dim, dst_tp), part,
                    format=fmt if fmt in quantize.QUANTIZED else None)
    # EP and PP: whole tensors (experts, layers) held by one rank on each side, moving.
    for name, shape, fmt, src_holder, dst_holder in _moving(src_tp, dst_tp, separate):
        if rank == src_holder:
            src.add(name, _global(name, shape, "bfloat16", 0).cuda(), shape)
        if rank == dst_holder:
            dst.add(name, _dst_tensor(shape, fmt), shape, format=fmt)
    plan = refit_engine.plan(src, dst, cast=True, ipc_sync=ipc_sync, timeout_s=60)
    out = {"assembled": plan.traffic["assembled"], "wrong": []}
    for seed, graph in ((0, False), (1, False), (2, True), (3, True)):
        if rank in src_ranks:
            for name, shape, dtype, dim, _ in TENSORS:
                n = shape[dim] // src_tp
                src.tensors[name].copy_(_global(name, shape, dtype, seed).narrow(dim, rank * n, n))
            for name, shape, _, src_holder, _ in _moving(src_tp, dst_tp, separate):
                if rank == src_holder:
                    src.tensors[name].copy_(_global(name, shape, "bfloat16", seed))
        if rank in dst_ranks:
            _poison(dst)
        torch.cuda.synchronize()
        # One refit with verify=True: transformed pieces checked as sent and landed too.
        refit_engine.execute(plan, graph=graph, verify=seed == 1)
        torch.cuda.synchronize()
        if rank in dst_ranks:
            out["wrong"] += [(seed, w) for w in _check(dst, dst_tp, list(dst_ranks).index(rank),
                                                       seed)]
            for name, shape, fmt, _, dst_holder in _moving(src_tp, dst_tp, separate):
                if rank != dst_holder:
                    continue
                q, scale = quantize.transform(_bits(_global(name, shape, "bfloat16", seed)),
                                              "bf16", fmt)
                if not (np.array_equal(_bits(dst.tensors[name]), q) and np.array_equal(
                        _bits(dst.scales[name].view(torch.uint8)).reshape(-1),
                        np.ascontiguousarray(scale).view(np.uint8).reshape(-1))):
                    out["wrong"].append((seed, name))
    plan.close()
    return out


@pytest.mark.parametrize("src_tp,dst_tp,separate,ipc_sync", [
    (2, 1, False, "device"), (2, 3, False, "device"), (3, 1, True, "device"),
    (1, 3, False, "host")])
def test_ipc_transforms_bit_exact(src_tp, dst_tp, separate, ipc_sync):
    world = src_tp + dst_tp if separate else max(src_tp, dst_tp)
    reports = run_world(_ipc_worker, world, src_tp, dst_tp, separate, ipc_sync, timeout=240)
    for rank, report in enumerate(reports):
        assert report["wrong"] == [], (rank, report)
    if (src_tp, dst_tp) == (2, 1):  # 192-row source shards cut a 128-row block: assembled
        assert reports[0]["assembled"] > 0, reports[0]
