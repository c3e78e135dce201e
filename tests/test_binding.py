"""Binding a plan to local tensors: tensors changed after planning (replaced, resized, freed)
refused before any byte moves, overlapping local tensors, shapes, zero-size and unsupported
tensors, and verification with NumPy arrays. Every refusal is a RefitError on every rank."""

import time

import numpy as np
import pytest
import torch

import refit_engine
from refit_engine import RefitError, ShardedTensors, Split

from multiproc import run_world

SHAPES = {"fc1": (32, 16), "proj": (16, 24), "norm": (16,)}
POISON = 0xA5


def _globals(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def _model(rank, tp, globals_, poison=False, shapes=SHAPES, numpy=False):
    """Rank `rank`'s part of a TP=`tp` model on ranks 0 and 1 (2-D tensors split on dim 0);
    `poison`: every byte POISON instead of the values; `numpy`: float32 NumPy arrays."""
    m = ShardedTensors()
    for name, shape in shapes.items():
        split = Split(0, tp) if tp > 1 and len(shape) == 2 else None
        local = globals_[name].chunk(tp, 0)[rank % tp] if split else globals_[name]
        local = local.clone().contiguous()
        if numpy:
            local = local.float().numpy().copy()
            if poison:
                local.view(np.uint8).fill(POISON)
        elif poison:
            local.view(torch.uint8).fill_(POISON)
        m.add(name, local, shape, split, rank % tp)
    return m


def _snapshot(local):
    """key -> (the bound object, a copy of its bytes), taken before anything changes."""
    return {k: (v, v.clone() if isinstance(v, torch.Tensor) else v.copy())
            for k, v in local.tensors.items()}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _unchanged(snapshot, skip=()):
    """Whether every snapshotted tensor (the objects bound, even if no longer in their
    ShardedTensors) still holds its bytes; `skip`: those changed on purpose (freed, resized)."""
    return all(_same(obj, copy) for k, (obj, copy) in snapshot.items() if k not in skip)


# -- 1. tensors changed after planning ------------------------------------------------------

def _stale_cases():
    """name -> (change(src, dst) on the changing rank, tensor named, keys no longer readable,
    words in the reason). `src`/`dst` are the rank's ShardedTensors."""

    def data_replaced_same_shape(s, d):  # the old storage is freed: a write-after-free before
        s.tensors["fc1"].data = torch.zeros_like(s.tensors["fc1"])

    def grown(s, d):
        s.tensors["proj"].resize_(64, 64)

    def shrunk(s, d):
        d.tensors["fc1"].resize_(2, 16)

    def storage_freed_src(s, d):
        s.tensors["norm"].untyped_storage().resize_(0)

    def storage_freed_dst(s, d):
        d.tensors["proj"].untyped_storage().resize_(0)

    def dst_data_replaced(s, d):
        d.tensors["norm"].data = torch.full_like(d.tensors["norm"], 7)

    def dst_entry_replaced(s, d):
        new = torch.empty_like(d.tensors["fc1"])
        new.view(torch.uint8).fill_(POISON)
        d.tensors["fc1"] = new

    def src_entry_replaced(s, d):
        s.tensors["proj"] = s.tensors["proj"].clone()

    def dtype_changed(s, d):
        d.tensors["proj"].data = d.tensors["proj"].data.view(torch.int16)

    return {
        "source .data replaced, same shape": (data_replaced_same_shape, "fc1", (), "replaced"),
        "source resized larger": (grown, "proj", (), "resized"),
        "destination resized smaller": (shrunk, "fc1", ("fc1",), "resized"),
        "source storage freed": (storage_freed_src, "norm", (), "storage"),
        "destination storage freed": (storage_freed_dst, "proj", ("proj",), "storage"),
        "destination .data replaced": (dst_data_replaced, "norm", ("norm",), "replaced"),
        "destination entry replaced": (dst_entry_replaced, "fc1", (), "ShardedTensors"),
        "source entry replaced": (src_entry_replaced, "proj", (), "ShardedTensors"),
        "destination dtype changed": (dtype_changed, "proj", ("proj",), "int16"),
    }


def _stale_worker(rank, world, changing_rank):
    out = {}
    for name, (change, _, skip, _) in _stale_cases().items():
        g = _globals(5)
        src, dst = _model(rank, 2, g), _model(rank, 1, g, poison=True)
        plan = refit_engine.plan(src, dst)
        refit_engine.execute(plan)  # fine before the change
        assert all(torch.equal(dst.tensors[k], g[k]) for k in SHAPES)
        for t in dst.tensors.values():
            t.view(torch.uint8).fill_(POISON)
        snapshot = _snapshot(dst)
        if rank == changing_rank:
            change(src, dst)
        try:
            refit_engine.execute(plan)
            out[name] = "no error"
        except RefitError as exc:
            out[name] = (exc.tensor, exc.ranks, exc.reason,
                         _unchanged(snapshot, skip if rank == changing_rank else ()))
        torch.distributed.barrier()
    return out


@pytest.mark.parametrize("changing_rank", [1])
def test_tensor_changed_after_planning_refused_on_every_rank(changing_rank):
    per_rank = run_world(_stale_worker, 2, changing_rank)
    for name, (_, tensor, _, words) in _stale_cases().items():
        outcomes = [r[name] for r in per_rank]
        for rank, outcome in enumerate(outcomes):
            assert outcome != "no error", f"{name}: rank {rank} did not raise"
            got_tensor, ranks, reason, unchanged = outcome
            assert got_tensor == tensor and ranks == [changing_rank], (name, outcome)
            assert words in reason and "after planning" in reason, (name, reason)
            assert unchanged, f"{name}: destination written on rank {rank}"
        assert len({(o[0], tuple(o[1]), o[2]) for o in outcomes}) == 1, (name, outcomes)


def _numpy_stale_worker(rank, world):
    out = {}
    cases = {
        "reshaped": lambda s, d: setattr(d.tensors["fc1"], "shape", (16, 32)),
        "reallocated": lambda s, d: s.tensors["proj"].resize((32, 24), refcheck=False),
        "entry replaced": lambda s, d: d.tensors.__setitem__("norm", d.tensors["norm"].copy()),
    }
    for name, change in cases.items():
        g = _globals(6)
        src, dst = _model(rank, 2, g, numpy=True), _model(rank, 1, g, poison=True, numpy=True)
        plan = refit_engine.plan(src, dst)
        refit_engine.execute(plan)
        for a in dst.tensors.values():
            a.view(np.uint8).fill(POISON)
        snapshot = _snapshot(dst)
        if rank == 0:
            change(src, dst)
        try:
            refit_engine.execute(plan)
            out[name] = "no error"
        except RefitError as exc:
            out[name] = (exc.tensor, exc.ranks, _unchanged(snapshot, {"fc1"} if rank == 0 else ()))
        torch.distributed.barrier()
    return out


def test_numpy_array_changed_after_planning_refused():
    per_rank = run_world(_numpy_stale_worker, 2)
    expected = {"reshaped": "fc1", "reallocated": "proj", "entry replaced": "norm"}
    for name, tensor in expected.items():
        for outcome in (r[name] for r in per_rank):
            assert outcome == (tensor, [0], True), (name, outcome)


def test_stale_check_cost_for_3000_tensors():
    """The per-refit check is a plain loop over records taken at binding: measured here for
    3000 torch tensors (printed with -s), and sanity-bounded."""
    from refit_engine.binding import record, stale_reason
    from refit_engine.layouts import BufferMeta
    local = ShardedTensors()
    current = {}
    for i in range(3000):
        t = torch.zeros(8, 8)
        local.tensors[f"t{i}"] = t
        meta = BufferMeta(0, f"t{i}", (8, 8), "float32")
        current[("source", i)] = record(meta, local, "source")

    class FakePlan:
        pass
    plan = FakePlan()
    plan.current = current
    assert stale_reason(plan) is None
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        stale_reason(plan)
        best = min(best, time.perf_counter() - t0)
    print(f"stale check, 3000 tensors: {best * 1e3:.2f} ms")
    assert best < 0.05
    local.tensors["t2999"].resize_(2)
    assert stale_reason(plan)[0] == "t2999"


# -- plan-time refusals: RefitError on every rank, naming tensor, ranks and reason ----------

def _refused_worker(rank, world, cases_name):
    """Plans every case of CASES[cases_name]; returns name -> (tensor, ranks, reason,
    destination unchanged) or "no error"."""
    out = {}
    for name, (make, *_) in CASES[cases_name](rank).items():
        snapshot = {}
        try:
            src, dst = make()
            snapshot = _snapshot(dst)
            refit_engine.plan(src, dst)
            out[name] = "no error"
        except RefitError as exc:
            out[name] = (exc.tensor, exc.ranks, exc.reason, _unchanged(snapshot))
        torch.distributed.barrier()
    return out


def _check_refused(cases_name):
    per_rank = run_world(_refused_worker, 2, cases_name)
    for name, (_, tensor, ranks, words) in CASES[cases_name](0).items():
        outcomes = [r[name] for r in per_rank]
        for rank, outcome in enumerate(outcomes):
            assert outcome != "no error", f"{name}: rank {rank} did not raise"
            got_tensor, got_ranks, reason, unchanged = outcome
            assert got_tensor == tensor and got_ranks == ranks, (name, outcome)
            for word in words:
                assert word in reason, (name, word, reason)
            assert unchanged, f"{name}: destination changed on rank {rank}"
        assert len({(o[0], tuple(o[1]), o[2]) for o in outcomes}) == 1, (name, outcomes)


def _overlap_cases(rank):
    g = _globals(7)

    def base():
        return _model(rank, 2, g), _model(rank, 1, g, poison=True)

    def destinations_share_memory():
        s, d = base()
        if rank == 1:  # norm laid over the last 8 elements of fc1 and 8 past it
            flat = torch.empty(32 * 16 + 8, dtype=torch.bfloat16)
            d.tensors["fc1"] = flat[:512].view(32, 16)
            d.tensors["norm"] = flat[504:520]
        return s, d

    def destination_over_source():
        s, d = base()
        if rank == 1:  # an in-place refit of norm: it is read and written at once
            d.tensors["norm"] = s.tensors["norm"]
        return s, d

    def destination_inside_source():
        s, d = base()
        if rank == 0:
            d.tensors["norm"] = s.tensors["proj"].view(-1)[100:116]
        return s, d

    return {
        "two destinations share memory": (destinations_share_memory, "fc1, norm", [1],
                                          ["destination local tensors 'fc1' and 'norm'",
                                           "rank 1", "share memory"]),
        "destination over a source": (destination_over_source, "norm", [1],
                                      ["source local tensor 'norm'",
                                       "destination local tensor 'norm'", "rank 1"]),
        "destination inside a source": (destination_inside_source, "proj, norm", [0],
                                        ["source local tensor 'proj'",
                                         "destination local tensor 'norm'", "rank 0"]),
    }


def _shape_cases(rank):
    g = _globals(9)

    def base():
        return _model(rank, 2, g), _model(rank, 1, g, poison=True)

    def replace(local, name, tensor, global_shape, **kw):
        local.entries = [e for e in local.entries if e.name != name]
        local.tensors.pop(name)
        local.add(name, tensor, global_shape, **kw)

    def transposed_destination():
        s, d = base()
        if rank == 1:  # fc1 (32, 16) given as its transpose, made contiguous
            replace(d, "fc1", torch.zeros(16, 32, dtype=torch.bfloat16), (32, 16))
        return s, d

    def flat_source_part():
        s, d = base()
        if rank == 0:  # TP part (16, 16) of fc1 given flat
            replace(s, "fc1", torch.zeros(256, dtype=torch.bfloat16), (32, 16), split=Split(0, 2),
                    part=0)
        return s, d

    def declared_part_shape():
        s, d = base()
        if rank == 1:
            replace(d, "proj", torch.zeros(24, 16, dtype=torch.bfloat16), (16, 24),
                    part_shape=(16, 24))
        return s, d

    return {
        "transposed destination": (transposed_destination, "fc1", [1],
                                   ["shape (16, 32)", "(32, 16)"]),
        "flat source part": (flat_source_part, "fc1", [0], ["shape (256,)", "(16, 16)"]),
        "declared part shape": (declared_part_shape, "proj", [1], ["shape (24, 16)", "(16, 24)"]),
    }


def _empty_cases(rank):
    g = _globals(10)

    def with_empty(local, name, shape, split=None):
        local_shape = split.local_shape(name, shape) if split else shape
        local.add(name, torch.zeros(local_shape, dtype=torch.bfloat16), shape, split, rank % 2)
        return local

    def only_in_source():
        return with_empty(_model(rank, 2, g), "z", (0, 4)), _model(rank, 1, g, poison=True)

    def only_in_destination():
        return _model(rank, 2, g), with_empty(_model(rank, 1, g, poison=True), "z", (0,))

    def shapes_differ():
        return (with_empty(_model(rank, 2, g), "z", (0, 4)),
                with_empty(_model(rank, 1, g, poison=True), "z", (4, 0)))

    return {
        "zero-size tensor only in the source": (only_in_source, "z", [0, 1], ["extra tensor"]),
        "zero-size tensor only in the destination": (only_in_destination, "z", [0, 1],
                                                     ["missing from the source"]),
        "zero-size tensors of different shapes": (shapes_differ, "z", [0, 1],
                                                  ["global shape differs", "(0, 4)", "(4, 0)"]),
    }


def _unsupported_cases(rank):
    g = _globals(12)

    def adding(side, name, make_tensor, on_rank, shape=(4,)):
        def make():
            s, d = _model(rank, 2, g), _model(rank, 1, g, poison=True)
            if rank == on_rank:
                (s if side == "source" else d).add(name, make_tensor(), shape)
            return s, d
        return make

    def nested():
        return torch.nested.nested_tensor([torch.zeros(2, 4), torch.zeros(2, 4)])

    def quantized():
        return torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.quint8)

    return {
        "sparse COO source": (adding("source", "sp", lambda: torch.eye(4).to_sparse(), 1, (4, 4)),
                              "sp", [1], ["sparse_coo", "dense"]),
        "sparse CSR destination": (adding("destination", "csr",
                                          lambda: torch.eye(4).to_sparse_csr(), 0, (4, 4)),
                                   "csr", [0], ["sparse_csr"]),
        "nested source": (adding("source", "nt", nested, 1, (2, 2, 4)), "nt", [1], ["nested"]),
        "quantized source": (adding("source", "q", quantized, 0), "q", [0], ["quantized"]),
        "negative-bit view": (adding("source", "neg",
                                     lambda: torch.zeros(4, dtype=torch.complex64).conj().imag,
                                     1), "neg", [1], ["negative"]),
        "conjugate view": (adding("destination", "cj",
                                  lambda: torch.zeros(4, dtype=torch.complex64).conj(), 1),
                           "cj", [1], ["conjugate"]),
    }


CASES = {"overlap": _overlap_cases, "shape": _shape_cases, "empty": _empty_cases,
         "unsupported": _unsupported_cases}


def test_overlapping_local_tensors_refused():
    _check_refused("overlap")


def _overlapping_sources_worker(rank, world):
    """Sources may share memory (read twice); adjacent destinations are fine."""
    g = _globals(8)
    src = ShardedTensors()
    flat = torch.empty(8 * 24 + 16, dtype=torch.bfloat16)
    proj = flat[:8 * 24].view(8, 24)
    proj.copy_(g["proj"].chunk(2, 0)[rank])
    norm = flat[8 * 24 - 16 + rank * 8:][:16]  # overlaps proj's tail on both ranks
    g["norm"] = norm.clone()  # what norm holds on rank 0 (rank 1's copy must agree)
    torch.distributed.broadcast(g["norm"], 0)
    norm.copy_(g["norm"])  # replicas agree now; proj's tail changed with it
    parts = [torch.empty(8, 24, dtype=torch.bfloat16) for _ in range(2)]
    torch.distributed.all_gather(parts, proj.clone())
    g["proj"] = torch.cat(parts)
    src.add("proj", proj, (16, 24), Split(0, 2), rank)
    src.add("norm", norm, (16,))
    dst = ShardedTensors()
    out = torch.empty(16 * 24 + 16, dtype=torch.bfloat16)
    out.view(torch.uint8).fill_(POISON)
    dst.add("proj", out[:16 * 24].view(16, 24), (16, 24))
    dst.add("norm", out[16 * 24:], (16,))  # starts where proj ends
    plan = refit_engine.plan(src, dst)
    refit_engine.execute(plan)
    return all(torch.equal(dst.tensors[k].view(torch.int16), g[k].view(torch.int16))
               for k in ("proj", "norm"))


def test_overlapping_sources_and_adjacent_destinations_refit_exactly():
    assert run_world(_overlapping_sources_worker, 2) == [True, True]


def test_local_shape_other_than_declared_refused():
    _check_refused("shape")


def test_unit_dims_and_grouped_buffers_still_accepted():
    from refit_engine.local import build_layout
    local = ShardedTensors()
    local.add("w", torch.zeros(1, 8, 4), (8, 4))  # a leading unit dim: same arrangement
    grouped = torch.zeros(2 * 8, 4)
    for e in range(2):
        local.add(f"e{e}", grouped, (8, 4), key="grouped", offset=e * 32, part_shape=(8, 4))
    assert not local.errors, local.errors
    build_layout([(0, local.entries)])


# -- 4. zero-size tensors -------------------------------------------------------------------

def _zero_size_worker(rank, world):
    from refit_engine.verify import check_exact
    shapes = dict(SHAPES, packed=(8, 4))
    g = _globals(11, shapes)
    src, dst = _model(rank, 2, g, shapes=SHAPES), _model(rank, 1, g, poison=True, shapes=SHAPES)
    # Zero-element tensors, split (TP 2 of nothing) and whole, on both sides.
    src.add("empty", torch.zeros(0, 16, dtype=torch.bfloat16), (0, 16), Split(0, 2), rank)
    dst.add("empty", torch.zeros(0, 16, dtype=torch.bfloat16), (0, 16))
    src.add("empty1d", torch.zeros(0, dtype=torch.bfloat16), (0,))
    dst.add("empty1d", torch.zeros(0, dtype=torch.bfloat16), (0,))
    # A zero-size block of a packed tensor: each rank holds rows [4 r, 4 r + 4) and nothing of
    # the second block.
    src.add("packed", g["packed"].chunk(2, 0)[rank].clone(), (8, 4), Split(0, 2, blocks=(4, 0)),
            rank)
    packed = torch.empty(8, 4, dtype=torch.bfloat16)
    packed.view(torch.uint8).fill_(POISON)
    dst.add("packed", packed, (8, 4))
    assert not src.errors and not dst.errors, (src.errors, dst.errors)
    plan = refit_engine.plan(src, dst)
    for _ in range(2):
        refit_engine.execute(plan, verify=True)
    exact = all(torch.equal(dst.tensors[k], g[k]) for k in shapes)
    return exact, check_exact(plan), dst.tensors["empty"].shape, plan.traffic["bytes_local"]


def test_zero_size_tensors_plan_and_refit():
    for exact, wrong, shape, _ in run_world(_zero_size_worker, 2):
        assert exact and wrong == [] and shape == (0, 16)


def test_zero_size_tensor_mismatches_refused():
    _check_refused("empty")


# -- 5. unsupported tensor layouts ----------------------------------------------------------

def test_sparse_nested_quantized_and_lazy_views_refused():
    _check_refused("unsupported")


# -- 6. verification with NumPy arrays ------------------------------------------------------

def _verify_numpy_worker(rank, world):
    from refit_engine.verify import check_exact
    out = []
    g = _globals(13)
    expected = {k: v.float().numpy() for k, v in g.items()}
    for src_numpy, dst_numpy in ((True, True), (True, False), (False, True)):
        src = _model(rank, 2, {k: v.float() for k, v in g.items()}, numpy=src_numpy)
        dst = _model(rank, 1, {k: v.float() for k, v in g.items()}, poison=True, numpy=dst_numpy)
        plan = refit_engine.plan(src, dst)
        refit_engine.execute(plan, verify=True)
        exact = all(np.array_equal(np.asarray(dst.tensors[k]).view(np.uint32),
                                   expected[k].view(np.uint32)) for k in SHAPES)
        out.append((exact, check_exact(plan)))
    return out


def test_verify_with_numpy_arrays():
    for per_config in run_world(_verify_numpy_worker, 2):
        assert per_config == [(True, [])] * 3


def test_numpy_and_torch_checksums_agree():
    from refit_engine.verify import segment_checksum
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2 ** 16, size=(64, 48), dtype=np.uint16)  # bytes up to 0xff
    t = torch.from_numpy(a.copy()).view(torch.bfloat16)
    for offset, pitch, rows, row_bytes in ((0, 96, 64, 96), (10, 96, 20, 30), (6000, 1, 1, 7)):
        assert segment_checksum(a, offset, pitch, rows, row_bytes) == \
            segment_checksum(t, offset, pitch, rows, row_bytes)
    b = a.copy()
    b.reshape(-1).view(np.uint8)[10 + 96 * 3 + 5] ^= 1
    assert segment_checksum(b, 10, 96, 20, 30) != segment_checksum(a, 10, 96, 20, 30)


def _restrided_worker(rank, world):
    import refit_engine
    from refit_engine import RefitError, ShardedTensors
    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w", torch.arange(16, dtype=torch.float32).reshape(4, 4) + rank * 0, (4, 4))
    target = torch.empty(4, 4)
    target.view(torch.uint8).fill_(0xA5)
    dst.add("w", target, (4, 4))
    plan = refit_engine.plan(src, dst, timeout_s=30)
    if rank == 1:
        target.t_()  # same address, shape and storage; the element order changed
    try:
        refit_engine.execute(plan)
        return "no error", None
    except RefitError as exc:
        return (exc.tensor, exc.ranks, exc.reason), bool(target.contiguous().view(torch.uint8).eq(0xA5).all())


def test_tensor_restrided_in_place_after_planning_refused():
    for outcome, untouched in run_world(_restrided_worker, 2):
        assert outcome != "no error" and outcome[1] == [1] and "restrided" in outcome[2], outcome
        assert untouched


def test_tensors_on_several_devices_are_named():
    from refit_engine.binding import device_of
    assert device_of({}, 0) == "cpu"
    assert device_of({"cuda:0": "source 'a'"}, 0) == "cuda:0"
    with pytest.raises(RefitError, match=r"source 'w' on cpu, destination 'router.expert_bias' "
                                         r"on cuda:0") as info:
        device_of({"cpu": "source 'w'", "cuda:0": "destination 'router.expert_bias'"}, 3)
    assert info.value.ranks == [3] and info.value.tensor == "w"


def test_checksums_of_a_view_read_the_view():
    """A bound tensor is often a view into a larger buffer: its checksum and region are its own
    bytes, not the buffer's from its start."""
    from refit_engine.verify import _region, segment_checksum
    buffer = torch.arange(4096, dtype=torch.int32)
    view = buffer[1000:1600].view(20, 30)
    copy = view.clone()
    assert view.storage_offset() == 1000
    for offset, pitch, rows, row_bytes in ((0, 120, 20, 120), (8, 120, 5, 40), (100, 1, 1, 9)):
        assert segment_checksum(view, offset, pitch, rows, row_bytes) == \
            segment_checksum(copy, offset, pitch, rows, row_bytes)
        assert np.array_equal(_region(view, offset, pitch, rows, row_bytes),
                              _region(copy, offset, pitch, rows, row_bytes))
