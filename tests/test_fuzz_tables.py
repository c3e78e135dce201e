"""Property-based fuzz of the plan compiler and the CPU copy, through their bindings.

(a) Random valid layouts (tensors of 0 to 4 dims, TP on any dim with partition stride or packed
    blocks, replicas, any set of ranks, own / shared flat / padded local tensors, collocated or
    not) refit bit for bit, and every copy of their plans stays inside its buffers.
(b) Random invalid raw tables fed straight to `_core.Planner` (bad cells, dtypes, shapes,
    strides, alignment, names, integer arguments) are refused with RefitError, ValueError or
    TypeError, never a crash; tables that a mutation left valid give in-bounds plans.
(c) Random segment tables for `_core.cpu_copy_segments` over real NumPy buffers: valid ones
    (in any integer dtype, strided, unaligned) copy exactly what the NumPy reference copies;
    invalid ones raise the documented error before any byte is written.

tests/test_sanitized.py runs this file against an ASan/UBSan build of the core, where reading
outside a table or any undefined behaviour fails the run. The regression tests at the end are
the bugs this fuzz and the sanitizers found.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from refit_engine import Layout, RefitError, Split, _core
from refit_engine.compiler import Planner
from refit_engine.executors.reference import _copy
from refit_engine.layouts import part_pieces, row_major_strides
from refit_engine.tables import BUFFER, PIECE, PIECE_FIELDS, SEG, SEGMENT_FIELDS, dim_field

from refit_check import check_refit

# REFIT_ENGINE_FUZZ_SCALE=10 runs ten times the examples (for a longer hunt).
SCALE = float(os.environ.get("REFIT_ENGINE_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
REFUSED = (RefitError, ValueError, TypeError)
COL = PIECE
DTYPES = ("uint8", "bfloat16", "float32", "float64")
INT64_MAX, INT64_MIN = 2**63 - 1, -2**63


# -- plans stay inside their buffers ----------------------------------------------------------

def _reach(offset, pitch, rows, row_bytes):
    last = (rows - 1) * pitch
    return offset + min(0, last), offset + max(0, last) + row_bytes


def assert_plans_in_bounds(src_buffers, dst_buffers, plans):
    """Every segment of every plan (dicts from _core or RankPlans) copies whole rows inside the
    bytes of its rank's buffers or its bucket's staging (computed with Python ints: a wrapped
    offset cannot pass as small)."""
    sides = {}
    for name, table in (("src", src_buffers), ("dst", dst_buffers)):
        rows = np.asarray(table).tolist()
        sides[name] = [(r[BUFFER["rank"]], r[BUFFER["numel"]] * r[BUFFER["itemsize"]])
                       for r in rows]  # (rank, bytes)
    for rank, plan in plans.items():
        get = plan.__getitem__ if isinstance(plan, dict) else lambda k: getattr(plan, k)
        staging = {"send": list(get("send_staging_bytes")), "recv": list(get("recv_staging_bytes"))}
        for kind in ("local", "send", "recv"):
            for seg in np.asarray(get(kind)).tolist():
                s = dict(zip(SEGMENT_FIELDS, seg))
                assert s["rows"] >= 1 and s["row_bytes"] >= 1, (rank, kind, s)
                for side in ("src", "dst"):
                    buffer = s[f"{side}_buffer"]
                    lo, hi = _reach(s[f"{side}_offset"], s[f"{side}_pitch"], s["rows"],
                                    s["row_bytes"])
                    staged = (kind, side) in (("send", "dst"), ("recv", "src"))
                    if staged:
                        assert buffer == -1, (rank, kind, s)
                        limit = staging[kind][s["bucket"]]
                    else:
                        assert 0 <= buffer < len(sides[side]), (rank, kind, s)
                        owner, limit = sides[side][buffer]
                        assert owner == rank, (rank, kind, s)
                    assert 0 <= lo and hi <= limit, (rank, kind, side, s, limit)


# -- (a) random valid layouts -----------------------------------------------------------------

@st.composite
def tensor_specs(draw):
    specs = []
    for i in range(draw(st.integers(1, 3))):
        shape = draw(st.lists(st.sampled_from([1, 2, 3, 4, 6, 8]), max_size=4))
        while math.prod(shape) > 384:
            shape.pop()
        specs.append((f"t{i}", tuple(shape), draw(st.sampled_from(DTYPES))))
    return specs


def divisors(n, cap):
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


@st.composite
def placement(draw, shape, world):
    """(split or None, [(rank, part)]) of one tensor on ranks [0, world)."""
    split, parts = None, 1
    if shape and draw(st.booleans()):
        dim = draw(st.integers(0, len(shape) - 1))
        size = shape[dim]
        parts = draw(st.sampled_from(divisors(size, world)))
        kind = draw(st.sampled_from(["plain", "stride", "blocks"]))
        if kind == "stride" and size % (2 * parts) == 0:
            split = Split(dim, parts, stride=2)
        elif kind == "blocks" and size // parts > 1:
            per_part, blocks = size // parts, []
            while sum(blocks) < per_part:
                blocks.append(draw(st.integers(1, per_part - sum(blocks))))
            split = Split(dim, parts, blocks=tuple(blocks))
        else:
            split = Split(dim, parts)
    replicas = draw(st.integers(1, world // parts))
    ranks = draw(st.permutations(range(world)))[:parts * replicas]
    return split, [(rank, k % parts) for k, rank in enumerate(ranks)]


def build_side(specs, placements, offset, storage, pad=0):
    """A Layout of `specs` placed as drawn, on ranks from `offset`. storage: 'own' (a local
    tensor per tensor), 'flat' (one flat local tensor per rank and dtype, parts back to back:
    replicas at different offsets are separate pieces of one box) or 'padded' (the last dim
    of each local tensor `pad` elements longer: not every element is a piece's)."""
    layout = Layout()
    local_shapes = []
    for (name, shape, dtype), (split, holders) in zip(specs, placements):
        ranks = [r for r, _ in holders]
        local_shapes.append(split.local_shape(name, shape, ranks) if split else shape)
    totals = {}
    for (name, shape, dtype), (split, holders), local in zip(specs, placements, local_shapes):
        for rank, _ in holders:
            totals[(rank, dtype)] = totals.get((rank, dtype), 0) + math.prod(local)
    used = {}
    for (name, shape, dtype), (split, holders), local in zip(specs, placements, local_shapes):
        holders = [(r + offset, p) for r, p in holders]
        if storage == "own" or (storage == "padded" and not shape):
            layout.place(name, shape, dtype, holders, split)
        elif storage == "flat":
            for rank, part in holders:
                key = (rank - offset, dtype)
                layout.place(name, shape, dtype, [(rank, part)], split, key=f"flat.{dtype}",
                             offset=used.get(key, 0), buffer_shape=(totals[key],))
                used[key] = used.get(key, 0) + math.prod(local)
        else:  # padded
            padded = tuple(local[:-1]) + (local[-1] + pad,)
            strides = row_major_strides(padded)
            layout.add_tensor(name, shape, dtype)
            for rank, part in holders:
                layout.add_buffer(rank, name, padded, dtype)
                for start, extent, local_offset in part_pieces(name, shape, split, part, strides):
                    layout.add_piece(name, rank, name, start, extent, local_offset, strides)
    return layout


@st.composite
def layout_pair(draw, max_world=6):
    specs = draw(tensor_specs())
    src_world, dst_world = draw(st.integers(1, max_world)), draw(st.integers(1, max_world))
    src_places = [draw(placement(shape, src_world)) for _, shape, _ in specs]
    dst_places = [draw(placement(shape, dst_world)) for _, shape, _ in specs]
    offset = 0 if draw(st.booleans()) else src_world  # collocated or not
    src = build_side(specs, src_places, 0, draw(st.sampled_from(["own", "flat", "padded"])),
                     pad=draw(st.integers(1, 3)))
    dst = build_side(specs, dst_places, offset, draw(st.sampled_from(["own", "flat"])))
    return src, dst


@settings(FUZZ, max_examples=int(100 * SCALE))
@given(pair=layout_pair(), bucket=st.sampled_from([7, 64, 1000, 1 << 20]),
       ranks_per_node=st.sampled_from([0, 1, 2, 3, 2**62]), seed=st.integers(0, 2**32 - 1))
def test_random_valid_layouts_refit_exactly(pair, bucket, ranks_per_node, seed):
    src, dst = pair
    plans = check_refit(src, dst, bucket_bytes=bucket, seed=seed, ranks_per_node=ranks_per_node)
    assert_plans_in_bounds(src.tables().buffers, dst.tables().buffers, plans)
    planner = Planner(src, dst, bucket_bytes=bucket, ranks_per_node=ranks_per_node)
    for rank in list(plans)[:2]:
        assert planner.plan_rank(rank).fingerprint() == plans[rank].fingerprint()


# -- (b) random invalid planner tables --------------------------------------------------------

INTERESTING = st.one_of(
    st.sampled_from([INT64_MIN, -2**62, -1, 0, 1, 2**31, 2**62, INT64_MAX - 2, INT64_MAX - 1,
                     INT64_MAX]),
    st.sampled_from([-2, 2, 3, 4, 8, 16, 2**24 - 1, 2**24, 2**31 - 1, 2**32, 2**62 + 1]),
    st.integers(-4, 40), st.integers(INT64_MIN, INT64_MAX))
BAD_INTS = st.sampled_from([0, -1, INT64_MIN, 2**63, 2**64, -2**64, 10**30, 1.5, 2.0, "64", None,
                            True, np.uint64(2**64 - 1), np.float64(3.0), [8]])
GOOD_BUCKETS = st.sampled_from([1, 5, 64, 1 << 20, np.int64(4096), INT64_MAX])
GOOD_NODES = st.sampled_from([0, 1, 2, 4, 2**62, INT64_MAX, np.int32(2)])


def unaligned(table):
    raw = np.zeros(table.nbytes + 1, np.uint8)
    out = raw[1:].view(table.dtype).reshape(table.shape)
    out[...] = table
    assert not out.flags.aligned or not out.size  # NumPy calls empty arrays aligned
    return out


RESHAPES = {
    "float64": lambda t: t.astype(np.float64),
    "int32": lambda t: t.astype(np.int32),
    "uint64": lambda t: t.astype(np.uint64),
    "bool": lambda t: t.astype(bool),
    "object": lambda t: t.astype(object),
    "big-endian": lambda t: t.astype(">i8"),
    "fortran": lambda t: np.asfortranarray(t) if t.ndim == 2 else t[::-1],
    "strided": lambda t: np.repeat(t, 2, axis=0)[::2],
    "unaligned": unaligned,
    "1-D/2-D": lambda t: t.reshape(-1) if t.ndim == 2 else t.reshape(-1, 1),
    "3-D": lambda t: t.reshape((1,) + t.shape),
    "drop column": lambda t: t[:, :-1].copy() if t.ndim == 2 else t[:-1].copy(),
    "extra column": lambda t: np.hstack([t, t[:, :1]]) if t.ndim == 2 else np.append(t, 0),
    "drop row": lambda t: t[:-1].copy(),
    "repeat row": lambda t: np.concatenate([t, t[-1:]]),
    "list": lambda t: t.tolist(),
    "None": lambda t: None,
    "scalar": lambda t: np.int64(3),
    "string": lambda t: "tables",
}
RENAMES = {
    "drop": lambda n: n[:-1],
    "append": lambda n: n + ["extra"],
    "duplicate": lambda n: n + n[:1],
    "rename": lambda n: ["renamed"] + n[1:],
    "ints": lambda n: list(range(len(n))),
    "str": lambda n: "t0",
    "None": lambda n: None,
}


def _ndim_of(tensors, t):
    """The ndim column of row `t` of a (maybe corrupted) tensor table, within [0, 4]."""
    try:
        return min(4, max(0, int(np.asarray(tensors)[int(t), 0])))
    except (IndexError, TypeError, ValueError):
        return 0


@st.composite
def corrupted_tables(draw):
    """Both sides' raw tables (names, tensors, buffers, pieces, holders) after 1 to 4 random
    corruptions, and the two integer arguments."""
    src, dst = draw(layout_pair(max_world=4))
    sides = [[list(t) if isinstance(t, list) else t.copy() for t in layout.tables()]
             for layout in (src, dst)]
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        tables = sides[draw(st.integers(0, 1))]
        kind = draw(st.sampled_from(["cell"] * 3 + ["nudge"] * 3 + ["reshape", "rename"]))
        # Mostly the tables checked late (pieces and holders): the tensor table is checked first.
        which = draw(st.sampled_from([1, 2, 2, 3, 3, 3, 3, 4, 4]))
        table = tables[which]
        if kind in ("cell", "nudge") and isinstance(table, np.ndarray) and table.size \
                and table.dtype == np.int64 and table.flags.c_contiguous:
            flat = table.reshape(-1)
            i = draw(st.integers(0, table.size - 1))
            if which == 3 and table.shape[1:] == (len(PIECE_FIELDS),) and draw(st.booleans()):
                # a field of a piece that is in use
                row = i // table.shape[1]
                ndim = _ndim_of(tables[1], table[row, COL["tensor"]])
                fields = ["tensor", "holders_first", "holders_count", "local_offset"] + [
                    dim_field(f, d) for f in ("start", "extent", "stride") for d in range(ndim)]
                i = row * table.shape[1] + COL[draw(st.sampled_from(fields))]
            if kind == "cell":
                flat[i] = draw(INTERESTING)
            else:  # a near miss: one more or less of a count, an extent, an offset, a rank
                flat[i] = max(INT64_MIN, min(INT64_MAX, int(flat[i]) + draw(st.sampled_from(
                    [-2, -1, 1, 2]))))
        elif kind == "reshape" and isinstance(table, np.ndarray) and table.size:
            tables[which] = RESHAPES[draw(st.sampled_from(sorted(RESHAPES)))](table)
        elif kind == "rename" and isinstance(tables[0], list) and tables[0]:
            tables[0] = RENAMES[draw(st.sampled_from(sorted(RENAMES)))](tables[0])
    rarely = st.sampled_from([False] * 9 + [True])  # mostly good arguments, to reach the tables
    bucket = draw(BAD_INTS if draw(rarely) else GOOD_BUCKETS)
    ranks_per_node = draw(BAD_INTS if draw(rarely) else GOOD_NODES)
    return sides, bucket, ranks_per_node


@settings(FUZZ, max_examples=int(400 * SCALE))
@given(case=corrupted_tables())
def test_invalid_tables_are_refused_not_crashed(case):
    (src_t, dst_t), bucket, ranks_per_node = case
    try:
        planner = _core.Planner(*src_t, *dst_t, bucket, ranks_per_node)
    except REFUSED as exc:  # statistics (--hypothesis-show-statistics): which checks fire
        reason = getattr(exc, "reason", str(exc))
        event(f"{type(exc).__name__}: {' '.join(reason.split()[:5])}")
        return
    event("accepted")
    # Still valid after the corruption (e.g. a value changed to another valid one): its plans
    # must stay inside the buffers the tables declare.
    plans = {p["rank"]: p for p in planner.plan_all()}
    assert_plans_in_bounds(src_t[2], dst_t[2], plans)
    for rank in list(plans)[:2]:
        one = planner.plan_rank(rank)
        for key in ("local", "send", "recv"):
            assert np.array_equal(one[key], plans[rank][key])
    for rank in (-1, INT64_MAX, INT64_MIN):  # nobody's: empty plans
        assert all(len(planner.plan_rank(rank)[k]) == 0 for k in ("local", "send", "recv"))


@pytest.mark.parametrize("value, match", [
    (2**64, "bucket_bytes 18446744073709551616 is out of range"),
    (-2**63 - 1, "bucket_bytes -9223372036854775809 is out of range"),
    (0, "bucket_bytes must be positive"),
    (1.5, "bucket_bytes must be an integer, got 1.5"),
    ("64", "bucket_bytes must be an integer, got '64'"),
    (None, "bucket_bytes must be an integer, got None"),
    (True, "bucket_bytes must be an integer, got True"),
])
def test_bad_bucket_bytes_is_a_refit_error(value, match):
    src, dst = _single("float32", (4,))
    with pytest.raises(RefitError, match=match):
        _core.Planner(*src.tables(), *dst.tables(), value, 0)


@pytest.mark.parametrize("value, match", [
    (2**63, "ranks_per_node 9223372036854775808 is out of range"),
    (-1, r"ranks_per_node must be 0 \(no node preference\) or positive, got -1"),
    ("4", "ranks_per_node must be an integer, got '4'"),
])
def test_bad_ranks_per_node_is_a_refit_error(value, match):
    src, dst = _single("float32", (4,))
    with pytest.raises(RefitError, match=match):
        _core.Planner(*src.tables(), *dst.tables(), 1 << 20, value)


def test_integer_like_arguments_are_accepted():
    src, dst = _single("float32", (4,))
    planner = _core.Planner(*src.tables(), *dst.tables(), np.int64(64), np.uint8(2))
    assert planner.ranks == [0]


def test_float_tensor_table_is_refused_not_truncated():
    src, dst = _single("float32", (4,))
    names, tensors, *rest = src.tables()
    with pytest.raises(RefitError, match="tensor table must be an integer array"):
        _core.Planner(names, tensors.astype(np.float64) + 0.5, *rest, *dst.tables(), 64, 0)
    # Other integer widths are converted (the tensor table is copied anyway).
    _core.Planner(names, tensors.astype(np.int32), *rest, *dst.tables(), 64, 0)


# -- (c) random segment tables for the CPU copy -----------------------------------------------

@st.composite
def segment_rows(draw, src_sizes, dst_sizes, count):
    """`count` segments, each inside the buffers of the sizes given (index -1: staging, the
    last size), pitches of either sign. Destination rows do not overlap within a segment (the
    reference and the C++ copy may write overlapping rows in different orders)."""
    rows_out = []
    for _ in range(count):
        seg = dict.fromkeys(SEGMENT_FIELDS, 0)
        seg["rows"], seg["row_bytes"] = draw(st.integers(1, 4)), draw(st.integers(1, 16))
        for side, sizes in (("src", src_sizes), ("dst", dst_sizes)):
            buffer = draw(st.integers(-1, len(sizes) - 2))
            pitch = draw(st.integers(-24, 24))
            if side == "dst" and seg["rows"] > 1 and abs(pitch) < seg["row_bytes"]:
                pitch = (seg["row_bytes"] + abs(pitch)) * (-1 if pitch < 0 else 1)
            lo, hi = _reach(0, pitch, seg["rows"], seg["row_bytes"])
            seg[f"{side}_buffer"], seg[f"{side}_pitch"] = buffer, pitch
            seg[f"{side}_offset"] = -lo + draw(st.integers(0, sizes[buffer] - (hi - lo)))
        rows_out.append([seg[f] for f in SEGMENT_FIELDS])
    return np.array(rows_out, dtype=np.int64).reshape(-1, len(SEGMENT_FIELDS))


SEGMENT_FAULTS = {  # name: (expected error, edit(segments, i, n_src, n_dst) in place)
    "src buffer past the end": (IndexError, lambda s, i, ns, nd: s.__setitem__((i, SEG["src_buffer"]), ns)),
    "dst buffer past the end": (IndexError, lambda s, i, ns, nd: s.__setitem__((i, SEG["dst_buffer"]), nd + 7)),
    "src buffer -2": (IndexError, lambda s, i, ns, nd: s.__setitem__((i, SEG["src_buffer"]), -2)),
    "dst buffer int64 min": (IndexError, lambda s, i, ns, nd: s.__setitem__((i, SEG["dst_buffer"]), INT64_MIN)),
    "negative rows": (ValueError, lambda s, i, ns, nd: s.__setitem__((i, SEG["rows"]), -1)),
    "negative row bytes": (ValueError, lambda s, i, ns, nd: s.__setitem__((i, SEG["row_bytes"]), INT64_MIN)),
    "rows x row bytes overflows": (ValueError, lambda s, i, ns, nd: s.__setitem__((i, [SEG["rows"], SEG["row_bytes"]]), 2**40)),
    "negative offset": (ValueError, lambda s, i, ns, nd: s.__setitem__((i, SEG["src_offset"]), -1)),
    "offset near int64 max": (ValueError, lambda s, i, ns, nd: s.__setitem__((i, SEG["dst_offset"]), INT64_MAX)),
    "pitch reaching below 0": (ValueError, lambda s, i, ns, nd: s.__setitem__(
        (i, [SEG["rows"], SEG["dst_pitch"]]), (2, -(int(s[i, SEG["dst_offset"]]) + 1)))),
    "pitch overflowing": (ValueError, lambda s, i, ns, nd: s.__setitem__((i, [SEG["rows"], SEG["src_pitch"]]), (3, 2**62))),
    "pitch int64 min": (ValueError, lambda s, i, ns, nd: s.__setitem__((i, [SEG["rows"], SEG["src_pitch"]]), (2, INT64_MIN))),
}
STRUCTURE_FAULTS = {  # name: (expected error, edit(segments, src addresses, dst addresses, threads))
    "float segments": (TypeError, lambda s, a, b, t: (s.astype(np.float64), a, b, t)),
    "bool segments": (TypeError, lambda s, a, b, t: (s.astype(bool), a, b, t)),
    "object segments": (TypeError, lambda s, a, b, t: (s.astype(object), a, b, t)),
    "string segments": (TypeError, lambda s, a, b, t: ("segments", a, b, t)),
    "None segments": (TypeError, lambda s, a, b, t: (None, a, b, t)),
    "1-D segments": (ValueError, lambda s, a, b, t: (s.reshape(-1), a, b, t)),
    "3-D segments": (ValueError, lambda s, a, b, t: (s.reshape((1,) + s.shape), a, b, t)),
    "10 columns": (ValueError, lambda s, a, b, t: (s[:, :-1], a, b, t)),
    "2-D addresses": (ValueError, lambda s, a, b, t: (s, a.reshape(-1, 1), b, t)),
    "float addresses": (TypeError, lambda s, a, b, t: (s, a, b.astype(np.float64), t)),
    "threads -1": (RefitError, lambda s, a, b, t: (s, a, b, -1)),
    "threads 4097": (RefitError, lambda s, a, b, t: (s, a, b, 4097)),
    "threads 2**40": (RefitError, lambda s, a, b, t: (s, a, b, 2**40)),
    "threads 2**70": (RefitError, lambda s, a, b, t: (s, a, b, 2**70)),
    "threads 1.5": (RefitError, lambda s, a, b, t: (s, a, b, 1.5)),
    "threads '2'": (RefitError, lambda s, a, b, t: (s, a, b, "2")),
    "threads None": (RefitError, lambda s, a, b, t: (s, a, b, None)),
    "threads True": (RefitError, lambda s, a, b, t: (s, a, b, True)),
}
DTYPE_FAULTS = {"float segments", "bool segments", "object segments"}
EQUIVALENT_FORMS = {  # the same table in another form: must copy the same bytes
    "int64": lambda s: s,
    "int32": lambda s: s.astype(np.int32),
    "uint64": lambda s: s.astype(np.uint64),
    "list": lambda s: s.tolist(),
    "strided": lambda s: np.repeat(s, 2, axis=0)[::2],
    "fortran": np.asfortranarray,
    "unaligned": unaligned,
}


@st.composite
def copy_cases(draw):
    src_sizes = draw(st.lists(st.integers(128, 512), min_size=1, max_size=3)) + [256]
    dst_sizes = draw(st.lists(st.integers(128, 512), min_size=1, max_size=2)) + [256]
    segments = draw(segment_rows(src_sizes, dst_sizes, draw(st.integers(0, 12))))
    fault = draw(st.sampled_from([None] + sorted(SEGMENT_FAULTS) + sorted(STRUCTURE_FAULTS)
                                 + ["null staging", "null address", "total overflows"]))
    form = draw(st.sampled_from(sorted(EQUIVALENT_FORMS)))
    threads = draw(st.sampled_from([0, 1, 2, 4, np.int64(3)]))
    return src_sizes, dst_sizes, segments, fault, form, threads, draw(st.randoms())


@settings(FUZZ, max_examples=int(300 * SCALE))
@given(case=copy_cases())
def test_cpu_copy_segments_fuzz(case):
    src_sizes, dst_sizes, segs, fault, form, threads, rnd = case
    rng = np.random.default_rng(rnd.getrandbits(32))
    src = [rng.integers(0, 256, n, dtype=np.uint8) for n in src_sizes]  # last: staging
    dst = [np.full(n, 0xA5, np.uint8) for n in dst_sizes]
    src_addr = np.array([b.ctypes.data for b in src[:-1]], np.int64)
    dst_addr = np.array([b.ctypes.data for b in dst[:-1]], np.int64)
    staging = [src[-1].ctypes.data, dst[-1].ctypes.data]
    args = [segs, src_addr, dst_addr, threads]
    expected = None
    n = len(segs)
    if fault in SEGMENT_FAULTS and n:
        expected, edit = SEGMENT_FAULTS[fault]
        edit(segs, rnd.randrange(n), len(src_addr), len(dst_addr))
    elif fault in STRUCTURE_FAULTS and (n or fault not in DTYPE_FAULTS):
        # (an empty table of any dtype is accepted: it has no values to misread)
        expected, edit = STRUCTURE_FAULTS[fault]
        args = list(edit(*args))
    elif fault == "null staging" and n:
        segs[rnd.randrange(n), SEG["dst_buffer"]] = -1
        staging[1], expected = 0, IndexError
    elif fault == "null address" and n:
        i = rnd.randrange(n)
        segs[i, SEG["src_buffer"]] = 0
        src_addr[0], expected = 0, IndexError
    elif fault == "total overflows":  # each segment alone is fine; all of them would pass int64
        huge = np.zeros((2, len(SEGMENT_FIELDS)), np.int64)
        huge[:, [SEG["rows"], SEG["row_bytes"]]] = (1, 3 << 61)
        args[0], expected = np.concatenate([segs, huge]), ValueError
    before = [b.copy() for b in dst]
    if expected is not None:
        with pytest.raises(expected):
            _core.cpu_copy_segments(args[0], args[1], staging[0], args[2], staging[1], args[3])
        for got, was in zip(dst, before):  # refused before copying anything
            assert np.array_equal(got, was)
        return
    want = [b.copy() for b in dst]
    _copy(segs, {i: b for i, b in enumerate(src[:-1])} | {-1: src[-1]},
          {i: b for i, b in enumerate(want[:-1])} | {-1: want[-1]})
    if form == "list" and n == 0:
        form = "int64"  # [] has lost the shape (0, 11)
    _core.cpu_copy_segments(EQUIVALENT_FORMS[form](segs), src_addr, staging[0], dst_addr,
                            staging[1], threads)
    for got, w in zip(dst, want):
        assert np.array_equal(got, w)


# -- regression tests: what the fuzz and the sanitizers found ---------------------------------

def _single(dtype, shape, rank=0):
    layouts = []
    for _ in range(2):
        layout = Layout()
        layout.place("w", shape, dtype, [(rank, 0)])
        layouts.append(layout)
    return layouts


def _raw(src, dst, edit, bucket=1 << 20):
    src_t = [t.copy() if hasattr(t, "copy") else list(t) for t in src.tables()]
    dst_t = [t.copy() if hasattr(t, "copy") else list(t) for t in dst.tables()]
    edit(src_t, dst_t)
    return _core.Planner(*src_t, *dst_t, bucket, 0), src_t, dst_t


def test_local_offset_at_int64_max_is_rejected():
    # The hull of a one-element piece at offset 2**63 - 1 ends at 2**63: it wrapped to -2**63,
    # passed as inside a one-element local tensor, and the plan wrote 4 bytes before it.
    def edit(src_t, dst_t):
        dst_t[3][0, COL["local_offset"]] = INT64_MAX
    with pytest.raises(RefitError, match="reaching past the range of 64-bit offsets"):
        _raw(*_single("float32", (1,)), edit)


def test_error_message_of_a_box_ending_past_int64():
    # Formatting the rejected box computed start + extent (UB: signed overflow under UBSan).
    def edit(src_t, dst_t):
        src_t[3][0, COL["start.0"]] = INT64_MAX - 2
    with pytest.raises(RefitError, match=r"piece \[9223372036854775805:\+4\] lies outside"):
        _raw(*_single("float32", (4,)), edit)


def test_holder_run_starting_near_int64_max_in_an_error_message():
    # The ranks of an error raised before pieces are checked: first + count overflowed.
    def edit(src_t, dst_t):
        dst_t[0] = ["other"]
        dst_t[3][0, COL["holders_first"]] = INT64_MAX
    with pytest.raises(RefitError, match="'other'.*has no source"):
        _raw(*_single("float32", (4,)), edit)


def test_overlapping_huge_source_boxes():
    # Three source boxes of ~2**62 elements overlapping: their volumes were summed (past int64)
    # before the overlap check. Tables only: nothing of that size is allocated.
    big = 2**62
    src = Layout()
    src.add_tensor("w", (big,), "uint8")
    for rank in range(3):
        src.add_buffer(rank, "w", (big,), "uint8")
        src.add_piece("w", rank, "w", (rank,), (big - rank,))
    dst = Layout()
    dst.place("w", (big,), "uint8", [(0, 0)])
    with pytest.raises(RefitError, match="overlap without being the same box"):
        Planner(src, dst)


def test_overlapping_huge_destination_pieces():
    # Three ~2**62-element pieces in one destination local tensor: the same sum, before the
    # check that they are disjoint.
    big = 2**62
    src, dst = Layout(), Layout()
    dst.add_buffer(0, "shared", (big,), "uint8")
    for name in "abc":
        src.place(name, (big - 1,), "uint8", [(1, 0)])
        dst.add_tensor(name, (big - 1,), "uint8")
        dst.add_piece(name, 0, "shared", (0,), (big - 1,))
    with pytest.raises(RefitError, match="written twice"):
        Planner(src, dst)


def test_huge_stride_after_a_small_one_is_planned_in_bounds():
    # Strides (4, 2**62, 1): whether dim 1 continues dim 0 compared 4 with 2 * 2**62, and
    # cutting the 2-row copy into buckets stepped the offsets 2 rows on, past its end (UB:
    # signed overflow, both). A valid layout (nothing allocated): its plan stays in bounds.
    src = Layout()
    src.add_tensor("w", (2, 2, 2), "uint8")
    src.add_buffer(0, "w", (2**62 + 8,), "uint8")
    src.add_piece("w", 0, "w", (0, 0, 0), (2, 2, 2), local_strides=(4, 2**62, 1))
    dst = Layout()
    dst.place("w", (2, 2, 2), "uint8", [(1, 0)])
    plans = Planner(src, dst).plan_all()
    assert_plans_in_bounds(src.tables().buffers, dst.tables().buffers, plans)
    assert sum(p.bytes_received for p in plans.values()) == 8


def test_unaligned_tables_are_refused():
    # Tables are read in place as int64 rows: an unaligned array was read misaligned.
    for which in (2, 3, 4):
        def edit(src_t, dst_t):
            src_t[which] = unaligned(src_t[which])
        with pytest.raises(RefitError, match="aligned, C-contiguous"):
            _raw(*_single("float32", (4,)), edit)


def test_cpu_copy_refuses_segments_reaching_outside_before_copying():
    # Negative offsets and rows x pitch past int64 were copied (out of bounds) unchecked.
    src, dst = np.arange(64, dtype=np.uint8), np.zeros(64, np.uint8)
    good = [0, 0, 0, 0, 0, 8, 0, 0, 8, 2, 8]
    for field, value, match in (("src_offset", -8, "reaches bytes before"),
                                ("dst_pitch", 2**63 - 1, "past the range of 64-bit"),
                                ("rows", -1, "negative or too large")):
        segs = np.array([good, good], np.int64)
        segs[1, SEG[field]] = value
        with pytest.raises(ValueError, match=match):
            _core.cpu_copy_segments(segs, np.array([src.ctypes.data]), 0,
                                    np.array([dst.ctypes.data]), 0)
        assert not dst.any()
    segs = np.array([good], np.int64)
    segs[0, SEG["dst_buffer"]] = -2  # was taken for staging
    with pytest.raises(IndexError, match="not bound"):
        _core.cpu_copy_segments(segs, np.array([src.ctypes.data]), 0,
                                np.array([dst.ctypes.data]), dst.ctypes.data)
    assert not dst.any()


def test_cpu_copy_thread_count_errors():
    segs = np.zeros((0, len(SEGMENT_FIELDS)), np.int64)
    no_buffers = np.zeros(0, np.int64)
    for bad in (-1, 2**31, 2**64, "1"):
        with pytest.raises(RefitError, match="threads must be an integer from 0 to 4096"):
            _core.cpu_copy_segments(segs, no_buffers, 0, no_buffers, 0, bad)
    _core.cpu_copy_segments(segs, no_buffers, 0, no_buffers, 0, np.int64(4096))

