"""Transforms inside the refit (issue 16) on CPU over gloo: casts, fp8_block128 and mxfp8
destinations through plan() / execute(), bit for bit against refit_engine.quantize.

Every multi-rank case builds fresh random global tensors, slices them into the source
layout, poisons the destination (data and scales), refits twice (new source values and
another poison the second time, so an unwritten element or a stale value shows) and compares
every destination local tensor with quantize.transform of the GLOBAL tensor, cut to the shard
(an independent route from verify.check_exact, which quantizes each local matrix). The
refusals check the error on every rank and that no destination or scale byte changed.

All multi-rank cases run in one 4-rank world (spawning ranks costs more than the cases);
each case reports per rank, and one test per case reads its report.
"""

from __future__ import annotations

import functools
import math
import traceback
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multiproc import run_world

import refit_engine
from refit_engine import RefitError, ShardedTensors, Split, quantize, transforms
from refit_engine.compiler import DEFAULT_BUCKET_BYTES, Planner
from refit_engine.harness.grid import ParallelGrid
from refit_engine.local import build_layout
from refit_engine.tables import SEG, SEGMENT_FIELDS
from refit_engine.verify import check_exact

WORLD = 4
# transforms.rectangles (named _rectangles before the wire refactor)
RECTANGLES = getattr(transforms, "rectangles", None) or transforms._rectangles
POISONS = (0xA5, 0x5A)
QUANTIZED = quantize.QUANTIZED
BITS = {"bf16": np.uint16, "fp16": np.uint16, "fp32": np.uint32}
SIGNED_NP = {"bf16": np.int16, "fp16": np.int16, "fp32": np.int32}
SIGNED = {"bf16": torch.int16, "fp16": torch.int16, "fp32": torch.int32}
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCKS = {"fp8_block128": (128, 128), "mxfp8": (1, 32)}
# Bit patterns every special-values tensor holds: NaNs (quiet, negative with payload,
# signalling), +-Inf, -0 and +0, the smallest and largest subnormals, +-max finite (and, for
# fp32, values either side of fp16's overflow threshold 65520).
SPECIAL = {
    "bf16": [0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x807F, 0x7F7F,
             0xFF7F],
    "fp16": [0x7E00, 0xFE01, 0x7C01, 0x7C00, 0xFC00, 0x8000, 0x0000, 0x0001, 0x83FF, 0x7BFF,
             0xFBFF],
    "fp32": [0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000, 0, 1,
             0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x477FF000, 0x477FEFFF],
}
INF = {"bf16": 0x7F80, "fp16": 0x7C00, "fp32": 0x7F800000}
SIGN = {"bf16": 0x8000, "fp16": 0x8000, "fp32": 0x80000000}
SUBNORMAL_MAX = {"bf16": 0x7F, "fp16": 0x3FF, "fp32": 0x7FFFFF}


# -- global tensors and their shards --------------------------------------------------------

@dataclass(frozen=True)
class T:
    """One global tensor of a case: source format, destination format (quantized, or a plain
    format: a cast, or the same: a plain copy) and its holders on either side, each
    (rank, split, part, group): group None (a local tensor of its own) or (key, index, count)
    (the index-th of `count` parts stored in one [count, ...] local tensor)."""

    name: str
    shape: tuple
    src: str
    dst: str
    src_holders: tuple
    dst_holders: tuple
    data: str = "normal"  # or "special"


def dense(grid: ParallelGrid, dim: int = 0, stage: int = 0) -> tuple:
    split = Split(dim, grid.tp) if grid.tp > 1 else None
    return tuple((r, split, p, None) for r, p in grid.dense_holders(stage))


def whole(*ranks) -> tuple:
    return tuple((r, None, 0, None) for r in ranks)


def global_bits(t: T, seed: int) -> np.ndarray:
    """The global tensor's bits (the same on every rank): normal values whose magnitude
    changes every 16 x 16 tile (so blocks and groups get different scales), and for
    data="special" every kind of bit pattern too."""
    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
    cols = t.shape[-1]
    x = rng.standard_normal((math.prod(t.shape) // cols, cols)).astype(np.float32)
    lo, hi = (-8, 6) if t.src == "fp16" else (-40, 40)
    tiles = rng.integers(lo, hi, size=(-(-x.shape[0] // 16), -(-cols // 16)))
    exps = np.repeat(np.repeat(tiles, 16, 0), 16, 1)[:x.shape[0], :cols]
    x = (x * np.ldexp(1.0, exps)).astype(np.float32)
    bits = quantize.cast(x.view(np.uint32), "fp32", t.src)
    if t.data == "special":
        bits = _with_specials(bits, t.src, rng)
    return bits.reshape(t.shape)


def _with_specials(b: np.ndarray, fmt: str, rng) -> np.ndarray:
    b = b.copy()
    rows, cols = b.shape
    mask = rng.random(b.shape) < 0.05  # random bit patterns: NaNs, Infs, subnormals and all
    rand = rng.integers(0, np.iinfo(BITS[fmt]).max, size=b.shape, dtype=BITS[fmt],
                        endpoint=True)
    b[mask] = rand[mask]
    special = np.array(SPECIAL[fmt], dtype=BITS[fmt])
    at = rng.choice(b.size, size=min(b.size, 8 * len(special)), replace=False)
    b.reshape(-1)[at] = np.resize(special, len(at))
    if rows >= 128 and cols >= 128:  # an all-zero block, -0 in places (scale_inv 1.0)
        b[:128, :128] = 0
        b[:128:7, :128:5] = SIGN[fmt]
    if rows >= 256 and cols >= 128:  # a block of subnormals only (fp32: the FLT_MIN clamp)
        sub = rng.integers(0, SUBNORMAL_MAX[fmt], size=(128, 128), endpoint=True)
        b[128:256, :128] = (sub | (rng.integers(0, 2, size=sub.shape) * SIGN[fmt])).astype(
            BITS[fmt])
    if rows >= 3 and cols >= 64:
        b[1, 32:64] = INF[fmt]  # an mxfp8 group of Infs only, and one holding a NaN
        b[2, 5] = SPECIAL[fmt][0]
    return b


def take_boxes(a: np.ndarray, t: T, split, part: int, unit: int = 1) -> np.ndarray:
    """Part `part` of `a` (the global tensor, or its scales with `unit` elements per scale
    along the split dim) as its local tensor holds it."""
    if split is None:
        return a
    pieces = []
    for g, _, size in split.boxes(t.name, t.shape, part):
        lo, hi = g // unit, -(-(g + size) // unit)
        pieces.append(np.take(a, np.arange(lo, hi), axis=split.dim))
    return np.concatenate(pieces, axis=split.dim)


def _uint8_dst(name: str) -> bool:
    """Half the quantized destinations are uint8 tensors, half float8_e4m3fn (by name, so
    every rank picks the same)."""
    return zlib.crc32(name.encode()) % 2 == 1


def _scale_given(name: str) -> bool:
    """Half the scale tensors are given to add(), half allocated by it."""
    return zlib.crc32(name.encode()) % 3 != 0


class Model:
    """Both sides of one case on this rank: the ShardedTensors and where each of this rank's
    parts lives ((side, name) -> (holder, key))."""

    def __init__(self, rank: int, tensors, seed: int):
        self.rank, self.tensors = rank, list(tensors)
        self.src, self.dst = ShardedTensors(), ShardedTensors()
        self.slots = {}
        made = {}
        for t in self.tensors:
            for side, holders in (("src", t.src_holders), ("dst", t.dst_holders)):
                for holder in holders:
                    if holder[0] == rank:
                        self._add(side, t, holder, made)
        self.fill(seed)
        self.poison(POISONS[0])

    def _add(self, side, t, holder, made):
        _, split, part, group = holder
        local_shape = split.local_shape(t.name, t.shape) if split else tuple(t.shape)
        fmt = t.src if side == "src" else t.dst
        model = self.src if side == "src" else self.dst
        key, kw = t.name, {}
        if group is not None:
            key, index, _ = group
            kw = {"key": key, "offset": index * math.prod(local_shape), "part_shape": local_shape}
        shape = local_shape if group is None else (group[2], *local_shape)
        if (side, key) not in made:
            if fmt in QUANTIZED:
                dtype = torch.uint8 if _uint8_dst(key) else torch.float8_e4m3fn
                tensor = torch.empty(shape, dtype=torch.uint8).view(dtype)
                scale = transforms.new_scale(tensor, fmt) if _scale_given(key) else None
            else:
                tensor, scale = torch.empty(shape, dtype=TORCH[fmt]), None
            made[(side, key)] = (tensor, scale)
        tensor, scale = made[(side, key)]
        if fmt in QUANTIZED and side == "dst":
            kw.update(format=fmt, scale=scale)
        model.add(t.name, tensor, t.shape, split, part, **kw)
        assert not model.errors, model.errors
        self.slots[(side, t.name)] = (holder, key)

    def view(self, side: str, name: str):
        """(data, scale or None) of this rank's part of `name` (a grouped part's own slice)."""
        (_, _, _, group), key = self.slots[(side, name)]
        model = self.src if side == "src" else self.dst
        data, scale = model.tensors[key], model.scales.get(key)
        if group is not None:
            data, scale = data[group[1]], (scale[group[1]] if scale is not None else None)
        return data, scale

    def fill(self, seed: int) -> None:
        """New source values, in place (the plan keeps its tensors)."""
        self.seed = seed
        for t in self.tensors:
            if ("src", t.name) in self.slots:
                (_, split, part, _), _ = self.slots[("src", t.name)]
                local = take_boxes(global_bits(t, seed), t, split, part)
                data, _ = self.view("src", t.name)
                data.view(SIGNED[t.src]).copy_(torch.from_numpy(
                    np.ascontiguousarray(local).view(SIGNED_NP[t.src])))

    def poison(self, byte: int) -> None:
        for key, tensor in self.dst.tensors.items():
            tensor.view(torch.uint8).fill_(byte)
            if key in self.dst.scales:
                self.dst.scales[key].view(torch.uint8).fill_(byte)

    def snapshot(self) -> dict:
        out = {k: t.view(torch.uint8).clone() for k, t in self.dst.tensors.items()}
        out.update({f"{k} (scale)": s.view(torch.uint8).clone()
                    for k, s in self.dst.scales.items()})
        return out

    def problems(self) -> list[str]:
        """Every destination part of this rank against the reference, scales included, and the
        dequantization check; [] when all is exact."""
        out = []
        for t in self.tensors:
            if ("dst", t.name) not in self.slots:
                continue
            (_, split, part, _), _ = self.slots[("dst", t.name)]
            full = global_bits(t, self.seed)
            want, want_scale = quantize.transform(full, t.src, t.dst)
            want = take_boxes(want, t, split, part)
            data, scale = self.view("dst", t.name)
            got = data.view(torch.uint8).numpy() if t.dst in QUANTIZED else \
                data.view(SIGNED[t.dst]).numpy().view(BITS[t.dst])
            where = f"rank {self.rank} {t.name} ({t.src} -> {t.dst})"
            if not np.array_equal(got, want):
                bad = np.argwhere(got != want)
                i = tuple(int(v) for v in bad[0])
                out.append(f"{where}: {len(bad)} of {want.size} elements differ, first at {i}: "
                           f"{int(got[i]):#x}, want {int(want[i]):#x}")
            if t.dst not in QUANTIZED:
                continue
            unit = BLOCKS[t.dst][split.dim] if split is not None else 1
            want_scale = take_boxes(want_scale, t, split, part, unit)
            got_scale = scale.numpy()
            got_bytes, want_bytes = got_scale.view(np.uint8), want_scale.view(np.uint8)
            if not np.array_equal(got_bytes, want_bytes):
                at = np.argwhere(got_bytes != want_bytes)[:4].tolist()
                out.append(f"{where}: scales differ at bytes {at}")
            src_local = take_boxes(full, t, split, part)
            msg = quantize.check_dequantized(src_local, t.src, got, got_scale, t.dst)
            if msg:
                out.append(f"{where}: {msg}")
        return out


def _plan(m: Model, **kw):
    kw.setdefault("timeout_s", 30)
    return refit_engine.plan(m.src if m.src.entries else None,
                             m.dst if m.dst.entries else None, **kw)


def refit_case(rank: int, tensors, seed: int = 0, corrupt=None, **kw) -> dict:
    """Plan once, refit twice (new values and poison the second time), check every part each
    time and with verify.check_exact. corrupt: (rank, tensor) whose data byte and then scale
    byte are flipped after the refit, each caught by check_exact (collective: every rank runs
    it the same number of times)."""
    m = Model(rank, tensors, seed)
    plan = _plan(m, **kw)
    problems, stats = [], []
    for step, poison in enumerate(POISONS):
        if step:
            m.fill(seed + 1000)
            m.poison(poison)
        # verify=True checks every piece as sent and landed, transformed ones included.
        stats.append(refit_engine.execute(plan, verify=True))
        problems += m.problems()
    out = {"problems": problems, "stats": stats[-1], "exact": check_exact(plan)}
    if corrupt is not None:
        caught = []
        for what in ("data", "scale"):
            mine = corrupt[0] == rank
            if mine:
                data, scale = m.view("dst", corrupt[1])
                flat = (data if what == "data" else scale).view(torch.uint8).reshape(-1)
                flat[flat.numel() // 2] ^= 0x01
            caught.append(check_exact(plan))
            if mine:
                flat[flat.numel() // 2] ^= 0x01
        caught.append(check_exact(plan))  # restored: exact again
        out["caught"] = caught
    plan.close()
    return out


def verify_case(rank: int, tensors, corrupt, seed: int = 0, **kw):
    """execute(verify=True) passes on a clean refit, then must fail on every rank, naming the
    tensor, when corrupt = (rank, tensor, "data" | "scale" | "carrier") has one byte of that
    rank's destination (its scale, its assembled carrier) flipped after the copies ran."""
    m = Model(rank, tensors, seed)
    plan = _plan(m, **kw)
    refit_engine.execute(plan, verify=True)
    who, name, what = corrupt
    if rank == who:
        data, scale = m.view("dst", name)
        if what == "carrier":
            key = m.slots[("dst", name)][1]
            data = next(t for t in plan.transforms.targets.values() if t.key == key).carrier
        flat = (scale if what == "scale" else data).view(torch.uint8).reshape(-1)
        real = plan.executor.run

        def run(*a, **k):
            result = real(*a, **k)
            flat[flat.numel() // 2] ^= 0x01
            return result
        plan.executor.run = run
    try:
        refit_engine.execute(plan, verify=True)
        error = None
    except RefitError as exc:
        error = (exc.tensor, exc.ranks, exc.reason)
    plan.close()
    return {"error": error}


def refused_case(rank: int, build, plan_kw=None) -> dict:
    """build(rank) -> (src, dst ShardedTensors or None); plan must refuse on every rank with
    nothing written."""
    src, dst = build(rank)
    for tensor in dst.tensors.values():
        tensor.view(torch.uint8).fill_(POISONS[0])
    for scale in dst.scales.values():
        scale.view(torch.uint8).fill_(POISONS[1])
    before = _bytes(dst)
    kw = dict(timeout_s=30, **(plan_kw(rank) if plan_kw else {}))
    try:
        refit_engine.plan(src, dst, **kw).close()
        error = None
    except RefitError as exc:
        error = (exc.tensor, exc.ranks, exc.reason, str(exc))
    return {"error": error, "untouched": _bytes(dst) == before}


def _bytes(model) -> dict:
    if model is None:
        return {}
    out = {k: bytes(t.contiguous().view(torch.uint8).reshape(-1).numpy())
           for k, t in model.tensors.items()}
    out.update({f"{k} (scale)": bytes(s.view(torch.uint8).reshape(-1).numpy())
                for k, s in model.scales.items()})
    return out


# -- the cases ------------------------------------------------------------------------------

def tp_tensors(sg: ParallelGrid, dg: ParallelGrid) -> list[T]:
    """Quantized and cast tensors split on either dim, TP `sg` -> `dg` (block-aligned for
    TP 1, 2 and 4: every one fused)."""
    return [
        T("fp8.rows", (512, 256), "bf16", "fp8_block128", dense(sg, 0), dense(dg, 0)),
        T("fp8.cols", (256, 512), "fp32", "fp8_block128", dense(sg, 1), dense(dg, 1)),
        T("mx.cols", (64, 256), "bf16", "mxfp8", dense(sg, 1), dense(dg, 1)),
        T("mx.rows", (96, 160), "fp16", "mxfp8", dense(sg, 0), dense(dg, 0)),
        T("cast.fp32.bf16", (64, 48), "fp32", "bf16", dense(sg, 0), dense(dg, 0)),
        T("cast.bf16.fp32", (40, 64), "bf16", "fp32", dense(sg, 1), dense(dg, 1)),
        T("cast.bf16.fp16", (64, 24), "bf16", "fp16", dense(sg, 0), dense(dg, 0)),
        T("cast.fp16.bf16", (32, 40), "fp16", "bf16", dense(sg, 1), dense(dg, 1)),
        T("plain", (32, 16), "bf16", "bf16", dense(sg, 0), dense(dg, 1)),
    ]


G = ParallelGrid
TP_CASES = {
    "tp2->tp1": (G(4, tp=2), G(4, tp=1), "collocated"),
    "tp1->tp2": (G(4, tp=1), G(4, tp=2), "collocated"),
    "tp2->tp4": (G(4, tp=2), G(4, tp=4), "collocated"),
    "tp4->tp2": (G(4, tp=4), G(4, tp=2), "collocated"),
    "tp2->tp1 non-collocated": (G(2, tp=2), G(2, tp=1, offset=2), "non-collocated"),
    "tp1->tp2 non-collocated": (G(2, tp=1), G(2, tp=2, offset=2), "non-collocated"),
    "tp2 on ranks 2-3 -> tp1 on 0-1": (G(2, tp=2, offset=2), G(2, tp=1), "non-collocated"),
}


def _tp_case(name):
    sg, dg, mode = TP_CASES[name]
    corrupt = (1, "fp8.rows") if name == "tp2->tp4" else None
    return lambda rank: refit_case(rank, tp_tensors(sg, dg), seed=len(name), mode=mode,
                                   cast=True, corrupt=corrupt)


def ep_tensors() -> list[T]:
    """Routed experts named by global index. fc1: one local tensor per expert, EP4 -> grouped
    [2, 256, 128] local tensors, EP2 with expert-DP 2 (fp8_block128). fc2: grouped [1, ...]
    EP4 -> grouped EP2 x expert-TP2 on the columns (mxfp8)."""
    experts, sg, dg, dg2 = 4, G(4, ep=4), G(4, ep=2), G(4, ep=2, etp=2)
    out = []
    for e in range(experts):
        out.append(T(f"decoder.layers.0.mlp.experts.{e}.linear_fc1.weight", (256, 128), "bf16",
                     "fp8_block128",
                     tuple((r, None, 0, None) for r, _, _ in sg.expert_holders(e, experts)),
                     tuple((r, None, 0, ("layers.0.experts.fc1", i, 2))
                           for r, _, i in dg.expert_holders(e, experts))))
        out.append(T(f"decoder.layers.0.mlp.experts.{e}.linear_fc2.weight", (128, 256), "bf16",
                     "mxfp8",
                     tuple((r, None, 0, ("layers.0.experts.fc2", i, 1))
                           for r, _, i in sg.expert_holders(e, experts)),
                     tuple((r, Split(1, 2), p, ("layers.0.experts.fc2", i, 2))
                           for r, p, i in dg2.expert_holders(e, experts))))
    return out


def pp_tensors() -> list[T]:
    """Four layers, TP2 x PP2 -> PP4 (each rank its own layer), a 1-D cast on each."""
    layers, sg, dg = 4, G(4, tp=2, pp=2), G(4, pp=4)
    out = []
    for layer in range(layers):
        s, d = sg.stage_of_layer(layers, layer), dg.stage_of_layer(layers, layer)
        out.append(T(f"decoder.layers.{layer}.self_attention.linear_proj.weight", (256, 256),
                     "bf16", "fp8_block128", dense(sg, 1, s), dense(dg, 1, d)))
        out.append(T(f"decoder.layers.{layer}.input_layernorm.weight", (256,), "fp32", "bf16",
                     dense(sg, 0, s), dense(dg, 0, d)))
    return out


def assembled_tensors() -> list[T]:
    """Source shards that cut blocks, destinations that hold whole ones: assembled."""
    sg, dg = G(4, tp=2), G(4, tp=1)
    return [T("asm.fp8", (384, 256), "bf16", "fp8_block128", dense(sg, 0), dense(dg, 0)),
            T("asm.mx", (64, 96), "fp32", "mxfp8", dense(sg, 1), dense(dg, 1))]


def edge_tensors() -> list[T]:
    """R, C not multiples of 128 (partial edge blocks and groups), whole and sharded; and
    384 rows TP3 (128-row shards: fine). cast=False: formats need no cast=True."""
    return [
        T("edge.asm", (200, 300), "bf16", "fp8_block128",
          tuple((r, Split(0, 2), r, None) for r in (0, 1)), whole(2)),
        T("edge.fused", (200, 300), "fp32", "fp8_block128", whole(3), whole(1)),
        T("edge.mx", (200, 300), "fp16", "mxfp8", whole(0), whole(3)),
        T("edge.shards", (256, 300), "bf16", "fp8_block128", whole(2),
          tuple((r, Split(0, 2), r, None) for r in (0, 1))),
        T("edge.mxshards", (50, 300), "bf16", "mxfp8", whole(1),
          tuple((r, Split(0, 2), r - 2, None) for r in (2, 3))),
        T("tp3", (384, 128), "bf16", "fp8_block128", whole(3),
          tuple((r, Split(0, 3), r, None) for r in (0, 1, 2))),
    ]


def special_tensors() -> list[T]:
    """NaN, +-Inf, -0, subnormals, huge values and random bit patterns in the source."""
    sg, dg = G(4, tp=2), G(4, tp=1)

    def t(name, shape, src, dst, dim=0):
        return T(name, shape, src, dst, dense(sg, dim), dense(dg, dim), data="special")

    return [t("sp.fp8.bf16", (256, 256), "bf16", "fp8_block128"),
            t("sp.fp8.fp32", (256, 256), "fp32", "fp8_block128", dim=1),
            t("sp.fp8.fp16", (256, 256), "fp16", "fp8_block128"),
            t("sp.mx.bf16", (128, 128), "bf16", "mxfp8", dim=1),
            t("sp.mx.fp32", (256, 128), "fp32", "mxfp8"),
            t("sp.cast.fp32.bf16", (64, 96), "fp32", "bf16"),
            t("sp.cast.fp32.fp16", (64, 96), "fp32", "fp16"),
            t("sp.cast.bf16.fp16", (64, 96), "bf16", "fp16"),
            t("sp.cast.fp16.bf16", (64, 96), "fp16", "bf16"),
            t("sp.cast.bf16.fp32", (64, 96), "bf16", "fp32"),
            t("sp.cast.fp16.fp32", (64, 96), "fp16", "fp32")]


# Refusals: each build(rank) -> (src, dst). The source is whole on every rank unless said.

def _src(rank, name, shape, dtype=torch.bfloat16, model=None):
    model = model or ShardedTensors()
    model.add(name, torch.zeros(shape, dtype=dtype), shape)
    return model


def _fp8(shape, dtype=torch.float8_e4m3fn):
    return torch.empty(shape, dtype=torch.uint8).view(dtype)


def _cut_fp8(rank):
    dst = ShardedTensors()
    dst.add("cut.fp8", _fp8((64, 128)), (256, 128), Split(0, 4), rank, format="fp8_block128")
    return _src(rank, "cut.fp8", (256, 128)), dst


def _cut_mx(rank):
    dst = ShardedTensors()
    if rank < 2:
        dst.add("cut.mx", _fp8((64, 48)), (64, 96), Split(1, 2), rank, format="mxfp8")
    return _src(rank, "cut.mx", (64, 96)), dst


def _int_source(rank):
    dst = ShardedTensors()
    dst.add("ints", _fp8((128, 128)), (128, 128), format="fp8_block128")
    return _src(rank, "ints", (128, 128), dtype=torch.int32), dst


def _format_on_source(rank):
    src = ShardedTensors()
    if rank == 0:
        src.add("q", _fp8((128, 128), torch.uint8), (128, 128), format="fp8_block128")
    dst = ShardedTensors()
    dst.add("q", torch.empty(128, 128, dtype=torch.uint8), (128, 128))
    return src, dst


def _one_dim(rank):
    dst = ShardedTensors()
    if rank == 2:
        dst.add("bias", _fp8((256,)), (256,), format="fp8_block128")
    else:
        dst.add("bias", torch.empty(256, dtype=torch.bfloat16), (256,))
    return _src(rank, "bias", (256,)), dst


def _three_dim(rank):
    dst = ShardedTensors()
    dst.add("w3", _fp8((2, 128, 128)), (2, 128, 128), format="fp8_block128")
    return _src(rank, "w3", (2, 128, 128)), dst


def _bogus(rank):
    dst = ShardedTensors()
    dst.add("w", _fp8((128, 128)), (128, 128), format="bogus" if rank == 1 else "mxfp8")
    return _src(rank, "w", (128, 128)), dst


def _wrong_dtype(rank):
    dst = ShardedTensors()
    dst.add("w", torch.empty((128, 128), dtype=torch.bfloat16), (128, 128),
            format="fp8_block128")
    return _src(rank, "w", (128, 128)), dst


def _scale_shape(rank):
    dst = ShardedTensors()
    scale = torch.empty((2, 3) if rank == 3 else (2, 2), dtype=torch.float32)
    dst.add("w", _fp8((256, 256)), (256, 256), format="fp8_block128", scale=scale)
    return _src(rank, "w", (256, 256)), dst


def _scale_dtype(rank):
    dst = ShardedTensors()
    scale = torch.empty((128, 4), dtype=torch.float32 if rank == 0 else torch.uint8)
    dst.add("w", _fp8((128, 128)), (128, 128), format="mxfp8", scale=scale)
    return _src(rank, "w", (128, 128)), dst


def _no_cast(rank):
    dst = ShardedTensors()
    dst.add("w", torch.empty((64, 64), dtype=torch.float32), (64, 64))
    return _src(rank, "w", (64, 64)), dst


def _off_grid(rank):
    """Two tensors in one [384, 128] local tensor, the second at local row 192: its blocks
    would not be the global tensor's 128-row blocks."""
    dst, src = ShardedTensors(), ShardedTensors()
    buf = _fp8((384, 128))
    dst.add("a", buf, (128, 128), key="both", offset=0, part_shape=(128, 128),
            format="fp8_block128")
    dst.add("b", buf, (128, 128), key="both", offset=192 * 128, part_shape=(128, 128),
            format="fp8_block128")
    _src(rank, "a", (128, 128), model=src)
    _src(rank, "b", (128, 128), model=src)
    return src, dst


def _valid(rank):
    dst = ShardedTensors()
    dst.add("w", _fp8((128, 128)), (128, 128), format="fp8_block128")
    return _src(rank, "w", (128, 128)), dst


REFUSALS = {
    "cuts a block": (_cut_fp8, None),
    "cuts a group": (_cut_mx, None),
    "int32 source": (_int_source, None),
    "format on a source": (_format_on_source, None),
    "1-D format": (_one_dim, None),
    "3-D format": (_three_dim, None),
    "bogus format": (_bogus, None),
    "fp8 of wrong dtype": (_wrong_dtype, None),
    "scale of wrong shape": (_scale_shape, None),
    "scale of wrong dtype": (_scale_dtype, None),
    "dtype differs": (_no_cast, None),
    "cast disagrees": (_no_cast, lambda rank: {"cast": rank != 2}),
    "off the block grid": (_off_grid, None),
    "valid (control)": (_valid, None),
}


def stale_scale_case(rank: int, how: str) -> dict:
    """A valid plan; after one refit rank 1 changes its scale tensor (`how`); the next
    execute must refuse on every rank, nothing written."""
    sg, dg = G(4, tp=2), G(4, tp=1)
    m = Model(rank, [T("w", (256, 128), "bf16", "fp8_block128", dense(sg, 0), dense(dg, 0))],
              seed=5)
    plan = _plan(m)
    refit_engine.execute(plan)
    first = m.problems()
    if rank == 1:
        scale = m.dst.scales["w"]
        if how == "replaced in scales":
            m.dst.scales["w"] = torch.empty_like(scale)
        elif how == "data swapped":
            scale.data = torch.empty_like(scale)
        elif how == "freed":
            scale.set_()  # its storage released (resize_ is refused: .numpy() views it)
    m.fill(6)
    if not (rank == 1 and how == "freed"):
        m.poison(POISONS[1])
    before = m.snapshot() if not (rank == 1 and how == "freed") else None
    try:
        refit_engine.execute(plan)
        error = None
    except RefitError as exc:
        error = (exc.tensor, exc.ranks, exc.reason)
    untouched = before is None or all(torch.equal(v, m.snapshot()[k]) for k, v in before.items())
    # Not refused: what the destination holds now (the new scale tensor still poisoned?).
    after = m.problems() if error is None and not (rank == 1 and how == "freed") else []
    plan.close()
    return {"first": first, "error": error, "untouched": untouched, "after": after}


CASES = {}
for _name in TP_CASES:
    CASES[_name] = _tp_case(_name)
CASES.update({
    "ep4->ep2 grouped": lambda rank: refit_case(rank, ep_tensors(), seed=3),
    "pp2->pp4": lambda rank: refit_case(rank, pp_tensors(), seed=4, cast=True),
    "assembled": lambda rank: refit_case(rank, assembled_tensors(), seed=5),
    "edges": lambda rank: refit_case(rank, edge_tensors(), seed=6),
    "special values": lambda rank: refit_case(rank, special_tensors(), seed=7, cast=True),
    "small buckets": lambda rank: refit_case(
        rank, tp_tensors(G(2, tp=2), G(2, tp=1, offset=2)), seed=8, cast=True,
        bucket_bytes=1000),
    # The plan compiler cuts buckets at bytes, so a bucket may end inside an element: those
    # tensors are assembled (their bytes land in a carrier), never transformed in pieces.
    "buckets cut elements (7 bytes)": lambda rank: refit_case(
        rank, [T("widen", (3, 7), "bf16", "fp32", whole(0), whole(1)),
               T("same size", (3, 7), "bf16", "fp16", whole(0), whole(1)),
               T("narrow", (3, 7), "fp32", "bf16", whole(0), whole(1))],
        seed=9, cast=True, bucket_bytes=7, mode="non-collocated"),
    "buckets cut elements (65 bytes)": lambda rank: refit_case(
        rank, [T("mx", (1, 33), "bf16", "mxfp8", whole(0), whole(1))], seed=10,
        bucket_bytes=65, mode="non-collocated"),
    "buckets cut elements (257 bytes)": lambda rank: refit_case(
        rank, [T("fp8", (1, 129), "bf16", "fp8_block128", whole(0), whole(1))], seed=11,
        bucket_bytes=257, mode="non-collocated"),
    "odd tensor before a cast (64 bytes)": lambda rank: refit_case(
        rank, [T("odd", (1, 3), "bf16", "bf16", whole(0), whole(1)),
               T("narrow", (3, 7), "fp32", "bf16", whole(0), whole(1))],
        seed=12, cast=True, bucket_bytes=64, mode="non-collocated"),
})
VERIFY_CASES = {
    "fused fp8 data": (1, "fp8.rows", "data"),
    "fused fp8 scale": (1, "fp8.rows", "scale"),
    "fused mxfp8 scale": (2, "mx.cols", "scale"),
    "fused cast": (3, "cast.fp32.bf16", "data"),
    "assembled fp8 data": (0, "asm.fp8", "data"),
    "assembled fp8 carrier": (0, "asm.fp8", "carrier"),
    "assembled mxfp8 scale": (2, "asm.mx", "scale"),
}
for _name, _corrupt in VERIFY_CASES.items():
    _tensors = (assembled_tensors if _name.startswith("assembled")
                else functools.partial(tp_tensors, G(4, tp=2), G(4, tp=4)))
    CASES[f"verify {_name}"] = functools.partial(verify_case, tensors=_tensors(),
                                                 corrupt=_corrupt, seed=13, cast=True)
for _name, (_build, _kw) in REFUSALS.items():
    CASES[f"refuse {_name}"] = functools.partial(refused_case, build=_build, plan_kw=_kw)
for _how in ("replaced in scales", "data swapped", "freed"):
    CASES[f"stale scale {_how}"] = functools.partial(stale_scale_case, how=_how)


def _all_cases(rank, world):
    out = {}
    for name, case in CASES.items():
        try:
            out[name] = ("ok", case(rank))
        except BaseException:  # noqa: BLE001 - reported per case; the next case goes on
            out[name] = ("error", traceback.format_exc())
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def world():
    return run_world(_all_cases, WORLD, timeout=600)


def reports(world, case) -> list:
    """The case's per-rank results, failing with any rank's traceback."""
    out = []
    for rank, results in enumerate(world):
        status, value = results[case]
        assert status == "ok", f"case {case!r}, rank {rank}:\n{value}"
        out.append(value)
    return out


def assert_exact(world, case) -> list:
    results = reports(world, case)
    for r in results:
        assert not r["problems"], "\n".join(r["problems"][:10])
        assert r["exact"] == [], r["exact"]
    return results


# -- single-process tests: rectangles and fused / assembled decisions -----------------------

def _segment(dst_offset, row_bytes, rows, dst_pitch, src_pitch):
    seg = np.zeros(len(SEGMENT_FIELDS), dtype=np.int64)
    seg[SEG["dst_offset"]], seg[SEG["row_bytes"]], seg[SEG["rows"]] = dst_offset, row_bytes, rows
    seg[SEG["dst_pitch"]], seg[SEG["src_pitch"]] = dst_pitch, src_pitch
    return seg


def _check_rectangles(batch, r, c, isz, e0, w, n, dp, sp):
    """_rectangles of a segment (element units: start e0, n rows of w, pitch dp; source pitch
    sp bytes) against the brute-force map destination element -> source byte offset."""
    want = {}
    for i in range(n):
        for j in range(w):
            want[e0 + i * dp + j] = i * sp + j * isz
    got = {}
    rects = RECTANGLES(_segment(e0 * isz, w * isz, n, dp * isz, sp), (r, c), isz)
    starts = []
    for offset, pitch, (b, r0, c0, rows, cols) in rects:
        assert 0 <= b < batch and rows > 0 and cols > 0, rects
        assert 0 <= r0 and r0 + rows <= r and 0 <= c0 and c0 + cols <= c, rects
        starts.append(offset)
        for y in range(rows):
            for x in range(cols):
                e = (b * r + r0 + y) * c + c0 + x
                assert e not in got, f"element {e} covered twice: {rects}"
                got[e] = offset + y * pitch + x * isz
    assert got == want, (batch, r, c, isz, e0, w, n, dp, sp, rects)
    assert starts == sorted(starts), rects  # in order


def test_rectangles_cover_every_element_once_at_its_source_offset():
    rng = np.random.default_rng(16)
    for trial in range(600):
        batch, r, c = (int(v) for v in rng.integers(1, [4, 9, 13], endpoint=True))
        isz = int(rng.choice([1, 2, 4]))
        numel = batch * r * c
        kind = trial % 5
        if kind == 0:    # one contiguous run, any length (across rows and matrices)
            n, w, dp = 1, int(rng.integers(1, numel, endpoint=True)), 0
        elif kind == 1:  # rows of the matrix, each inside a matrix row
            w, dp = int(rng.integers(1, c, endpoint=True)), c
            n = int(rng.integers(1, max(1, (numel - w) // c + 1), endpoint=True))
        elif kind == 2:  # contiguous destination rows, pitched source
            w = int(rng.integers(1, c, endpoint=True))
            n, dp = int(rng.integers(1, max(1, numel // w), endpoint=True)), w
        else:            # general: rows wider than the matrix, any pitch
            w = int(rng.integers(1, 2 * c + 1))
            dp = w + int(rng.integers(0, 2 * c))
            n = int(rng.integers(1, 4))
        span = (n - 1) * dp + w
        if span > numel:
            continue
        e0 = int(rng.integers(0, numel - span, endpoint=True))
        sp = w * isz + int(rng.integers(0, 3)) * isz * (kind != 0)
        _check_rectangles(batch, r, c, isz, e0, w, n, dp, sp)
    # Named ones: a row crossing two matrices; full rows of two matrices; one element.
    _check_rectangles(2, 4, 8, 2, 3 * 8 + 5, 6, 1, 6, 12)
    _check_rectangles(2, 4, 8, 2, 2 * 8, 8, 4, 8, 16)
    _check_rectangles(3, 2, 2, 4, 11, 1, 1, 1, 4)


def _side(per_rank):
    return [(r, m.entries) for r, m in sorted(per_rank.items())]


def _simulate(rank, src, dst, cast=False, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """plan()'s planning steps in one process (src / dst: {rank: ShardedTensors}): this
    rank's RankTransforms and plan."""
    for m in (*src.values(), *dst.values()):
        assert not m.errors, m.errors
    src_layout = build_layout(_side(src))
    carrier_per_rank, formats = transforms.carrier_entries(_side(src), _side(dst), cast)
    carrier, dst_layout = build_layout(carrier_per_rank), build_layout(_side(dst))
    transforms.check_quantized_pieces(carrier, formats)
    rank_plan = Planner(src_layout, carrier, bucket_bytes, 0).plan_rank(rank)
    bound = {i: dst[rank].tensors[dst_layout.buffers[i].key]
             for i in dst_layout.buffers_of(rank)}
    rt = transforms.RankTransforms(rank_plan, dst_layout, formats, bound, dst[rank].scales,
                                   lambda n: torch.empty(n, dtype=torch.uint8))
    return rt, rank_plan


def _tp(name, shape, dtype, tp, dim, fmt=None, ranks=(0, 1)):
    """{rank: ShardedTensors} of `name` split `tp` ways on `dim` over `ranks` (DP beyond)."""
    out = {}
    for i, rank in enumerate(ranks):
        m = ShardedTensors()
        split = Split(dim, tp) if tp > 1 else None
        local = split.local_shape(name, shape) if split else shape
        if fmt:
            m.add(name, _fp8(local), shape, split, i % tp, format=fmt)
        else:
            m.add(name, torch.zeros(local, dtype=dtype), shape, split, i % tp)
        out[rank] = m
    return out


def _isz(target) -> int:
    """Bytes per element of a transformed local tensor."""
    return 1 if target.fmt.quantized else np.dtype(BITS[target.fmt.dst]).itemsize


def _covered(rt, rank_plan):
    """{buffer: element hits} of the fused transform rows of this rank's local copies and
    unpacks (destination element counts from each row's address, rows, cols and pitch)."""
    hits = {}
    for segments in (rank_plan.local, rank_plan.recv):
        if not len(segments):
            continue
        plain, rows = rt.split(np.zeros(len(segments), dtype=np.int64), segments)
        into = np.isin(segments[:, SEG["dst_buffer"]], list(rt.targets))
        fused = [b for b in segments[:, SEG["dst_buffer"]] if rt.targets.get(int(b)) and
                 rt.targets[int(b)].carrier is None]
        assert (~plain).sum() == len(fused) and not (~plain & ~into).any()
        table = rows.table() if len(rows) else {k: [] for k in rows.columns}
        for i in range(len(rows)):
            t = next(t for t in rt.targets.values()
                     if t.address <= table["dst"][i] < t.address + math.prod(t.shape) * _isz(t))
            out_isz = _isz(t)
            count = hits.setdefault(t.buffer, np.zeros(math.prod(t.shape), dtype=np.int64))
            e0 = (table["dst"][i] - t.address) // out_isz
            pitch = table["dst_pitch"][i] // out_isz
            for y in range(table["rows"][i]):
                count[e0 + y * pitch:e0 + y * pitch + table["cols"][i]] += 1
    return hits


@pytest.mark.parametrize("case", [
    # (name, shape, src dtype, src TP, dst TP, dim, format, assembled?, cast, bucket bytes)
    ("fp8 aligned", (512, 256), torch.bfloat16, 2, 1, 0, "fp8_block128", False, False, None),
    ("fp8 cut source", (384, 256), torch.bfloat16, 2, 1, 0, "fp8_block128", True, False, None),
    ("fp8 columns", (128, 512), torch.float32, 4, 2, 1, "fp8_block128", False, False, None),
    ("mx aligned", (64, 96), torch.float32, 3, 1, 1, "mxfp8", False, False, None),
    ("mx cut source", (64, 96), torch.float32, 2, 1, 1, "mxfp8", True, False, None),
    ("mx rows", (48, 64), torch.float16, 4, 1, 0, "mxfp8", False, False, None),
    ("cast never assembled", (384, 256), torch.float32, 2, 1, 0, "bf16", False, True, None),
    ("fp8 bucket cuts", (512, 256), torch.bfloat16, 2, 1, 0, "fp8_block128", True, False,
     1000),
])
def test_rank_transforms_fuse_or_assemble(case):
    name, shape, dtype, stp, dtp, dim, fmt, assembled, cast, bucket = case
    ranks = tuple(range(max(stp, dtp, 2)))
    src = _tp("w", shape, dtype, stp, dim, ranks=ranks)
    if fmt in QUANTIZED:
        dst = _tp("w", shape, None, dtp, dim, fmt=fmt, ranks=ranks)
    else:
        dst = _tp("w", shape, TORCH[fmt], dtp, dim, ranks=ranks)
    for rank in ranks:
        rt, rank_plan = _simulate(rank, src, dst, cast=cast,
                                  bucket_bytes=bucket or DEFAULT_BUCKET_BYTES)
        assert len(rt.targets) == 1, name
        (t,) = rt.targets.values()
        numel = math.prod(t.shape)
        assert rt.assembled == (["w"] if assembled else []), (name, rank)
        hits = _covered(rt, rank_plan)
        if assembled:
            # copies land in the carrier; one finishing row per matrix quantizes it
            assert rt.carrier_bytes == numel * torch.empty(0, dtype=dtype).element_size()
            assert not hits
            fin = rt.finish_table()
            assert fin["rows"].tolist() == [t.shape[0]] and fin["cols"].tolist() == [t.shape[1]]
            assert fin["src"].tolist() == [t.carrier.data_ptr()]
        else:
            assert rt.carrier_bytes == 0 and rt.finish_table() is None
            assert hits[t.buffer].tolist() == [1] * numel, (name, rank)  # each element once


def test_grouped_destination_rows_land_in_their_matrix():
    """Two experts in one [2, 256, 128] fp8 local tensor: fused, each matrix covered once,
    the scale rows at each matrix's own scales."""
    src, dst = {}, {}
    for rank in (0, 1):
        s = ShardedTensors()
        s.add(f"e{rank}", torch.zeros((256, 128), dtype=torch.bfloat16), (256, 128))
        src[rank] = s
        d = ShardedTensors()
        if rank == 0:
            buf = _fp8((2, 256, 128))
            for e in (0, 1):
                d.add(f"e{e}", buf, (256, 128), key="experts", offset=e * 256 * 128,
                      part_shape=(256, 128), format="fp8_block128")
            assert d.scales["experts"].shape == (2, 2, 1)
        dst[rank] = d
    rt, rank_plan = _simulate(0, src, dst)
    (t,) = rt.targets.values()
    assert rt.assembled == [] and t.shape == (2, 256, 128)
    assert _covered(rt, rank_plan)[t.buffer].tolist() == [1] * (2 * 256 * 128)
    scale = dst[0].scales["experts"]
    seen = set()
    for segments in (rank_plan.local, rank_plan.recv):
        if not len(segments):
            continue
        table = rt.split(np.zeros(len(segments), dtype=np.int64), segments)[1].table()
        for dst_addr, scale_addr in zip(table["dst"].tolist(), table["scale"].tolist()):
            e, rest = divmod(dst_addr - t.address, 256 * 128)
            r0, c0 = divmod(rest, 128)
            assert r0 % 128 == 0 and c0 == 0
            assert scale_addr == scale.data_ptr() + (e * 2 + r0 // 128) * 4
            seen.add(e)
    assert seen == {0, 1}


def test_shard_that_cuts_a_block_is_refused_in_planning():
    src = _tp("w", (256, 128), torch.bfloat16, 1, 0, ranks=(0, 1, 2, 3))
    dst = _tp("w", (256, 128), None, 4, 0, fmt="fp8_block128", ranks=(0, 1, 2, 3))
    with pytest.raises(RefitError) as info:
        _simulate(0, src, dst)
    assert info.value.tensor == "w" and "cuts" in info.value.reason
    assert "256 x 128" in info.value.reason and "[0, 64)" in info.value.reason


# -- multi-rank: bit-exact refits ------------------------------------------------------------

@pytest.mark.parametrize("case", list(TP_CASES))
def test_tp_changes_bit_exact(world, case):
    results = assert_exact(world, case)
    sg, dg, _ = TP_CASES[case]
    holders = {r for r, _ in dg.dense_holders()}
    quantized = sum(1 for t in tp_tensors(sg, dg) if t.src != t.dst)
    for rank, r in enumerate(results):
        stats = r["stats"]
        assert stats["transformed"] == (quantized if rank in holders else 0), (rank, stats)
        assert stats["assembled"] == 0 and stats["carrier_bytes"] == 0, (rank, stats)  # fused
    # Fused pieces crossing between ranks travel transformed (refit_engine.wire): every rank
    # that sends or receives some saves bytes on the wire, and what it saves is accounted.
    # (TP1 -> TP2 on 4 ranks reads every shard from a local DP replica: nothing moves.)
    moving = [r["stats"] for r in results if r["stats"]["bytes_sent"] or r["stats"]["bytes_received"]]
    assert all(s["wire_bytes_saved"] > 0 for s in moving), moving
    assert moving or case == "tp1->tp2", case


@pytest.mark.parametrize("case", ["buckets cut elements (7 bytes)",
                                  "buckets cut elements (65 bytes)",
                                  "buckets cut elements (257 bytes)",
                                  "odd tensor before a cast (64 bytes)"])
def test_buckets_that_cut_elements(world, case):
    results = assert_exact(world, case)
    assert any(r["stats"]["assembled"] for r in results), [r["stats"] for r in results]


def test_check_exact_catches_a_corrupted_fp8_byte_and_scale(world):
    results = reports(world, "tp2->tp4")
    for rank, r in enumerate(results):
        data, scale, restored = r["caught"]
        assert data == (["fp8.rows"] if rank == 1 else []), (rank, data)
        assert scale == (["fp8.rows"] if rank == 1 else []), (rank, scale)
        assert restored == []


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_catches_a_corrupted_transformed_destination(world, case):
    """execute(verify=True) checks transformed destinations too: a fused one in its own
    format against its senders' transform of what they sent, an assembled one as the plain
    bytes in its carrier and then its transform of the carrier."""
    who, name, _ = VERIFY_CASES[case]
    errors = [r["error"] for r in reports(world, f"verify {case}")]
    assert errors[0] is not None, f"{case}: verify=True did not notice"
    assert all(e == errors[0] for e in errors), f"ranks raised different errors: {errors}"
    tensor, ranks, reason = errors[0]
    assert tensor == name and who in ranks and "verification failed" in reason, errors[0]


def test_ep_change_into_grouped_quantized_experts(world):
    results = assert_exact(world, "ep4->ep2 grouped")
    for r in results:
        assert r["stats"]["transformed"] == 2 and r["stats"]["assembled"] == 0, r["stats"]


def test_pp_change(world):
    results = assert_exact(world, "pp2->pp4")
    assert all(r["stats"]["transformed"] == 2 for r in results)


def test_assembled_when_a_source_shard_cuts_a_block(world):
    results = assert_exact(world, "assembled")
    for r in results:
        s = r["stats"]
        assert s["transformed"] == 2 and s["assembled"] == 2, s
        assert s["carrier_bytes"] == 384 * 256 * 2 + 64 * 96 * 4, s


def test_partial_edge_blocks_and_tp3(world):
    results = assert_exact(world, "edges")
    # rank 2's whole 200 x 300 tensor comes from 100-row shards: assembled; the rest fused
    assert [r["stats"]["assembled"] for r in results] == [0, 0, 1, 0]
    assert [r["stats"]["transformed"] for r in results] == [2, 3, 3, 2]


def test_special_values(world):
    assert_exact(world, "special values")


def test_small_buckets_cut_segments(world):
    results = assert_exact(world, "small buckets")
    assert [r["stats"]["assembled"] > 0 for r in results] == [False, False, True, True]


# -- multi-rank: refusals --------------------------------------------------------------------

def refusal(world, name):
    results = reports(world, f"refuse {name}")
    errors = [r["error"] for r in results]
    assert all(e is not None for e in errors), f"{name}: planned on ranks " \
        f"{[i for i, e in enumerate(errors) if e is None]}"
    assert all(e == errors[0] for e in errors), errors  # the same error on every rank
    assert all(r["untouched"] for r in results), name
    return errors[0]


@pytest.mark.parametrize("name, tensor, ranks, words", [
    ("cuts a block", "cut.fp8", [0], ["cuts", "256 x 128", "rows [0, 64)", "row 64", "128 x 128"]),
    ("cuts a group", "cut.mx", [0], ["cuts", "64 x 96", "cols [0, 48)", "col 48", "32-element"]),
    ("int32 source", "ints", [0], ["float32, bfloat16 or float16 source", "int32"]),
    ("format on a source", "q", [0], ["describes a destination", "source tensor"]),
    ("1-D format", "bias", [2], ["2-D"]),
    ("3-D format", "w3", [0], ["2-D", "(2, 128, 128)"]),
    ("bogus format", "w", [1], ["'bogus'", "fp8_block128"]),
    ("fp8 of wrong dtype", "w", [0], ["float8_e4m3fn", "bfloat16"]),
    ("scale of wrong shape", "w", [3], ["float32", "(2, 2)", "(2, 3)"]),
    ("scale of wrong dtype", "w", [0], ["uint8", "(128, 4)", "float32"]),
    ("dtype differs", "w", [0, 1, 2, 3], ["dtype differs", "bfloat16 and float32"]),
    ("cast disagrees", "*", [0, 1, 2, 3], ["disagree", "cast=True", "cast=False"]),
    ("off the block grid", "b", [0], ["local row 192", "global row 0", "128 x 128"]),
])
def test_refused_on_every_rank_before_any_byte_moves(world, name, tensor, ranks, words):
    got_tensor, got_ranks, reason, message = refusal(world, name)
    assert f"tensor '{got_tensor}' (ranks {got_ranks})" in message, message
    assert got_tensor == tensor, (got_tensor, reason)
    assert got_ranks == ranks, (got_ranks, reason)
    for w in words:
        assert w in reason, (w, reason)


def test_control_case_plans(world):
    assert all(r["error"] is None for r in reports(world, "refuse valid (control)"))


@pytest.mark.parametrize("how", [
    "data swapped",
    "freed",
    "replaced in scales",
])
def test_scale_changed_after_planning_is_refused(world, how):
    results = reports(world, f"stale scale {how}")
    assert all(not r["first"] for r in results), results[0]["first"]
    errors = [r["error"] for r in results]
    assert all(e is not None for e in errors), \
        f"executed after the scale was {how}; then: {[r['after'] for r in results]}"
    assert all(e == errors[0] for e in errors), errors
    tensor, ranks, reason = errors[0]
    assert "w" in tensor and "scale" in tensor and ranks == [1], errors[0]
    assert "after planning" in reason, reason
    assert all(r["untouched"] for r in results)
