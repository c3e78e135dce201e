"""megatron-core's refit test cases (`tests/unit_tests/resharding/test_model_swap.py`, main =
core_r0.19.0) through the drop-in `refit_engine.megatron.swap_model_weights`, on 8 gloo ranks.

Each case builds megatron's test model at the source and the destination layout
(`refit_engine.harness.models.megatron_gpt`), poisons every destination parameter and
persistent buffer (all bits set: NaN), swaps, and checks every destination tensor bit for bit
against the source's global weights, rebuilt from the source's seed with this file's own
naming and slicing (layer and expert indices from `ParallelGrid` rank arithmetic, TP slices from
megatron's `partition_dim` / `partition_stride`; nothing from the adapter's `describe`), and
again with `refit_engine.verify.check_exact` (gathers the source's shards). Where megatron-core's
own refit can do the layout (`baselines.megatron_refit` refuses those it gets wrong or hangs
on), it refits the poisoned destination again and must land the same bits.

megatron's test checks logits after a forward pass (allclose 5e-4); these checks are per tensor
and exact. Its rows are numbered as in its parametrize lists (1-26 GPT, 27-29 expert bias, 30
non-collocated expert bias, 31-35 Mamba); "bf16-*" cases are ours.

Every case runs in ONE 8-rank world (megatron's CI world), one after another, so the machine
pays for starting and importing megatron once.
"""

import pytest

pytest.importorskip("megatron.core")

import torch
from multiproc import run_world

WORLD = 8
SRC_SEED, DST_SEED = 11, 22
POISON = 0xFF  # every bit set: NaN in fp32 and bf16

# (row, group, (src tp, pp, ep), (dst tp, pp, ep), model); model: None dense, "moe", "latent",
# "latent_mtp"; dtype float32 unless the row says bf16.
SWAP_GPT = [
    (1, "dense", (2, 1, 1), (1, 1, 1), None),
    (2, "dense", (1, 1, 1), (2, 1, 1), None),
    (3, "dense", (2, 1, 1), (4, 1, 1), None),
    (4, "dense", (1, 2, 1), (1, 1, 1), None),
    (5, "dense", (1, 1, 1), (1, 2, 1), None),
    (6, "dense", (2, 2, 1), (1, 1, 1), None),
    (7, "dense", (1, 1, 1), (2, 2, 1), None),
    (8, "dense", (2, 1, 1), (1, 2, 1), None),
    (9, "dense", (1, 2, 1), (2, 1, 1), None),
    (10, "dense", (1, 2, 1), (2, 4, 1), None),
    (11, "moe", (1, 1, 2), (1, 1, 4), "moe"),
    (12, "moe", (1, 1, 2), (1, 1, 1), "moe"),
    (13, "moe", (1, 1, 1), (1, 1, 2), "moe"),
    (14, "moe", (1, 1, 2), (1, 2, 2), "moe"),
    (15, "moe", (2, 1, 2), (1, 1, 1), "moe"),
    (16, "moe", (1, 1, 1), (2, 1, 2), "moe"),
    (17, "moe", (4, 1, 1), (2, 1, 2), "moe"),
    (18, "moe", (2, 1, 2), (4, 1, 1), "moe"),
    (19, "moe", (4, 1, 1), (1, 1, 4), "moe"),
    (20, "moe", (1, 1, 4), (4, 1, 1), "moe"),
    (21, "latent", (1, 1, 2), (1, 1, 1), "latent"),
    (22, "latent", (2, 1, 2), (1, 1, 1), "latent"),
    (23, "latent", (1, 1, 1), (2, 1, 2), "latent"),
    (24, "latent_mtp", (1, 1, 1), (1, 1, 2), "latent_mtp"),
    (25, "latent_mtp", (2, 1, 2), (1, 1, 1), "latent_mtp"),
    (26, "latent_mtp", (1, 1, 1), (2, 1, 2), "latent_mtp"),
]
EXPERT_BIAS = [  # test_router_expert_bias_refit: (src tp, ep) -> (dst tp, ep), PP1
    (27, (2, 2), (1, 1)),
    (28, (1, 1), (2, 2)),
    (29, (1, 2), (2, 2)),
]
MAMBA = [  # test_swap_mamba_parametrized: (src tp, pp) -> (dst tp, pp)
    (31, (2, 1), (1, 1)),
    (32, (1, 1), (2, 1)),
    (33, (2, 1), (4, 1)),
    (34, (1, 1), (2, 2)),
    (35, (2, 1), (1, 2)),
]


def _case_list():
    """Every case as a dict (what the ranks build and check)."""
    def case(row, group, model, src, dst, dtype="float32", src_ranks=None, dst_ranks=None):
        return {"row": row, "group": group, "model": model, "src": src, "dst": dst,
                "dtype": dtype, "src_ranks": src_ranks, "dst_ranks": dst_ranks}

    cases = []
    for row, group, s, d, model in SWAP_GPT:
        cases.append(case(row, group, model, s, d))
    for row, (stp, sep), (dtp, dep) in EXPERT_BIAS:
        cases.append(case(row, "expert_bias", "expert_bias", (stp, 1, sep), (dtp, 1, dep)))
    # test_router_expert_bias_refit_non_collocated: TP2 on ranks 0-1 -> TP2 on ranks 2-3;
    # ranks 4-7 pass None for both models.
    cases.append(case(30, "non_collocated", "expert_bias", (2, 1, 1), (2, 1, 1),
                      src_ranks=(0, 2), dst_ranks=(2, 2)))
    # Ours: bf16 parameters (expert_bias stays fp32), a dense and an MoE layout.
    cases.append(case("bf16-1", "bf16", None, (2, 1, 1), (1, 1, 1), dtype="bfloat16"))
    cases.append(case("bf16-15", "bf16", "moe", (2, 1, 2), (1, 1, 1), dtype="bfloat16"))
    return cases


def _name(case) -> str:
    s, d = case["src"], case["dst"]
    text = (f"row {case['row']}: TP{s[0]}/PP{s[1]}/EP{s[2]} -> TP{d[0]}/PP{d[1]}/EP{d[2]} "
            f"{case['model'] or 'dense'}")
    if case["src_ranks"]:
        text += " (source on ranks 0-1, destination on ranks 2-3)"
    return text + ("" if case["dtype"] == "float32" else f" {case['dtype']}")


# -- the rank body ------------------------------------------------------------------------------


def _bits(tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _canonical(name: str, layout, rank: int, num_layers: int, num_experts):
    """(canonical name, is routed expert, ep-local expert) of a local tensor name, from the
    grid's rank arithmetic (megatron's order: tp, dp, pp dense; etp, ep, edp, pp experts)."""
    import re
    local_rank = rank - layout.offset
    per_stage = layout.world // layout.pp
    stage = local_rank // per_stage
    layers = list(layout.stage_layers(num_layers, stage))
    name = re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{layers[int(m[1])]}.", name)
    expert = None
    m = re.search(r"\.experts\.local_experts\.(\d+)\.(.+)$", name) or \
        re.search(r"\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$", name)
    if m:
        ep_index = (local_rank % per_stage) // layout.etp % layout.ep
        if m.re.pattern.startswith(r"\.experts\.local"):
            k, rest = int(m[1]), m[2]
        else:
            k, rest = int(m[3]), f"{m[1]}.{m[2]}"
        expert = ep_index * (num_experts // layout.ep) + k
        name = f"{name[:m.start()]}.experts.{expert}.{rest}"
    return name, expert is not None


def _expected(name, tensor, is_param, layout, rank, cfg, seed):
    """The slice of the global tensor (drawn from `seed`) this rank's tensor must hold."""
    import torch

    from refit_engine.harness.models.megatron_builder import _canonical_values
    canonical, is_expert = _canonical(name, layout, rank, cfg.num_layers, cfg.num_experts)
    local_rank = rank - layout.offset
    parts, index = 1, 0
    if is_param and getattr(tensor, "tensor_model_parallel", False):
        parts = layout.etp if is_expert else layout.tp
        index = local_rank % parts  # tp (and etp) is the fastest grid dimension
    dim = int(getattr(tensor, "partition_dim", 0))
    stride = int(getattr(tensor, "partition_stride", 1)) if parts > 1 else 1
    shape = list(tensor.shape)
    shape[dim] *= parts
    full = _canonical_values(canonical, tuple(shape), seed).to(tensor.dtype)
    if parts == 1:
        return full
    pieces = torch.chunk(full, parts * stride, dim)
    return torch.cat([pieces[s * parts + index] for s in range(stride)], dim)


def _tensors(model):
    """(name, tensor, is_param) for every parameter and persistent buffer."""
    if model is None:
        return []
    chunk = model[0]
    out = [(n, p, True) for n, p in chunk.named_parameters()]
    for module_name, module in chunk.named_modules():
        for b, buf in module._buffers.items():
            if buf is not None and b not in module._non_persistent_buffers_set:
                out.append((f"{module_name}.{b}" if module_name else b, buf, False))
    return out


def _oracle(model, layout, rank, cfg, seed):
    """Names of this rank's tensors that differ, bit for bit, from the global weights of
    `seed` (empty: exact)."""
    return [name for name, t, is_param in _tensors(model)
            if not torch.equal(
                _bits(t), _bits(_expected(name, t, is_param, layout, rank, cfg, seed)))]


def _poison(model):
    for _, t, _ in _tensors(model):
        t.data.view(torch.uint8).fill_(POISON)


def _config(case):
    from refit_engine.harness.models.megatron_gpt import GPTTestConfig
    if case["model"] == "expert_bias":
        return GPTTestConfig.expert_bias_moe(dtype=case["dtype"])
    pipelined = case["src"][1] > 1 or case["dst"][1] > 1
    experts = None if case["model"] is None else 4
    mode = case["model"] if case["model"] in ("latent", "latent_mtp") else None
    return GPTTestConfig.swap_gpt(experts, mode, pipelined=pipelined, dtype=case["dtype"])


def _layouts(case, world):
    from refit_engine.harness.models.megatron_gpt import megatron_test_grid
    out = []
    for side in ("src", "dst"):
        tp, pp, ep = case[side]
        first, size = case[f"{side}_ranks"] or (0, world)
        out.append(megatron_test_grid(size, tp=tp, pp=pp, ep=ep, offset=first))
    return out


def _megatron_check(src, dst, src_pgs, dst_pgs, ours):
    """megatron-core's refit into the poisoned destination: 'same' or what differs from ours,
    or why it was not run. Collective."""
    import torch

    from refit_engine.errors import RefitError
    from refit_engine.harness.baselines.megatron_refit import megatron_refit
    from refit_engine.harness.models.megatron_builder import megatron_version
    _poison(dst)
    try:
        megatron_refit(src, dst, src_pgs, dst_pgs, method="gloo", strict=True)
    except RefitError as exc:
        why = str(exc).split("\n")[0]
        return {"ran": False, "why": why.split("): ", 1)[-1].split(": it ")[0]}
    try:  # megatron-core >= 0.19: plans cached by layout, dropped per case
        from megatron.core.resharding import refit as mc_refit
        getattr(mc_refit, "clear_all_caches", lambda: None)()
    except ImportError:
        pass
    differs = [name for name, t, _ in _tensors(dst) if not torch.equal(_bits(t), ours[name])]
    return {"ran": True, "version": megatron_version(), "differs": differs}


def _destroy_groups(pgs):
    """Destroy every process group of a collection (local: gloo groups need no collective)."""
    if pgs is None:
        return
    seen = set()
    for group in vars(pgs).values():
        if isinstance(group, torch.distributed.ProcessGroup) and id(group) not in seen:
            seen.add(id(group))
            torch.distributed.destroy_process_group(group)


def _world(rank, world, cases, compare_megatron):
    import time
    import warnings

    import torch

    from refit_engine.harness.models.megatron_builder import build_process_groups
    from refit_engine.harness.models.megatron_gpt import build_gpt, mamba_unavailable, unsupported
    from refit_engine.megatron import cached_plan, clear_caches, swap_model_weights
    from refit_engine.verify import check_exact
    warnings.filterwarnings("ignore", category=UserWarning)
    # Process groups per layout: built at a layout's first case (collective, same order on
    # all ranks), destroyed after its last (every gloo group keeps threads and sockets).
    groups = {}
    last_use = {layout: i for i, case in enumerate(cases) for layout in _layouts(case, world)}

    def pgs_of(layout):
        if layout not in groups:
            groups[layout] = build_process_groups(layout)
        return groups[layout]

    report = {"mamba": mamba_unavailable(), "cases": {}}
    for number, case in enumerate(cases):
        start = time.perf_counter()
        cfg = _config(case)
        src_layout, dst_layout = _layouts(case, world)
        reason = unsupported(cfg, src_layout) or unsupported(cfg, dst_layout)
        if reason:
            report["cases"][case["row"]] = {"skipped": reason}
            continue
        try:
            phases = {}
            mark = time.perf_counter()

            def phase(what, phases=phases):
                nonlocal mark
                now = time.perf_counter()
                phases[what] = round(now - mark, 2)
                mark = now

            src_pgs, dst_pgs = pgs_of(src_layout), pgs_of(dst_layout)
            phase("groups")
            src = build_gpt(cfg, src_layout, src_pgs, seed=SRC_SEED) or None
            dst = build_gpt(cfg, dst_layout, dst_pgs, seed=DST_SEED) or None
            phase("build")
            entry = {"src_wrong": _oracle(src, src_layout, rank, cfg, SRC_SEED)}
            _poison(dst)
            entry["tensors"] = len(_tensors(dst))
            entry["unpoisoned"] = entry["tensors"] - len(
                _oracle(dst, dst_layout, rank, cfg, SRC_SEED))
            entry["buffers"] = {n: str(t.dtype) for n, t, p in _tensors(dst) if not p}
            phase("oracle")
            swap_model_weights(src, dst, refit_method="gloo")
            phase("swap")
            entry["wrong"] = _oracle(dst, dst_layout, rank, cfg, SRC_SEED)
            entry["exact_wrong"] = check_exact(cached_plan(src, dst))
            phase("check_exact")
            if compare_megatron:
                ours = {name: _bits(t).clone() for name, t, _ in _tensors(dst)}
                entry["megatron"] = _megatron_check(src, dst, src_pgs, dst_pgs, ours)
                phase("megatron")
            clear_caches()
            del src, dst
            entry["phases"] = phases
        except Exception as exc:  # names the layout; the other ranks then fail or time out
            raise RuntimeError(f"{_name(case)} raised on rank {rank}") from exc
        entry["seconds"] = time.perf_counter() - start
        report["cases"][case["row"]] = entry
        for layout in [lay for lay in groups if last_use[lay] == number]:
            _destroy_groups(groups.pop(layout))
    torch.distributed.barrier()
    return report


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swaps():
    """Every case, run once in one world: {row: (case, [per-rank entry])}, and Mamba's reason."""
    cases = _case_list()
    reports = run_world(_world, WORLD, cases, True, timeout=420)
    results = {c["row"]: (c, [r["cases"][c["row"]] for r in reports]) for c in cases}
    table = ["row | layout | ours | megatron-core's refit | seconds"]
    for row, (case, entries) in results.items():
        table.append(f"{row} | {_name(case)} | {_verdict(entries)} | {_megatron(entries)} | "
                     f"{entries[0].get('seconds', 0):.1f}")
    print("\n" + "\n".join(table))
    return results, reports[0]["mamba"]


def _verdict(entries) -> str:
    if "skipped" in entries[0]:
        return f"skipped: {entries[0]['skipped']}"
    bad = _failures(entries)
    return "passed" if not bad else "FAILED: " + "; ".join(bad)


def _failures(entries) -> list:
    bad = []
    for rank, e in enumerate(entries):
        for key, what in (("src_wrong", "source not at its seed"),
                          ("wrong", "destination differs from the source"),
                          ("exact_wrong", "check_exact differs")):
            if e.get(key):
                bad.append(f"rank {rank}: {what}: {e[key][:4]}")
        if e.get("unpoisoned"):
            bad.append(f"rank {rank}: {e['unpoisoned']} tensors matched before the swap")
    return bad


def _megatron(entries) -> str:
    m = entries[0].get("megatron")
    if m is None:
        return "not run"
    if not m["ran"]:
        return f"not compared ({m['why']})"
    differs = sorted({n for e in entries for n in e["megatron"]["differs"]})
    if not differs:
        return f"same bits ({m['version']})"
    if not _buffers_refit(m["version"]) and all(n.endswith("expert_bias") for n in differs):
        return f"same parameter bits ({m['version']} does not refit buffers: expert_bias)"
    return f"differs ({m['version']}): {differs[:4]}"


def _check_group(swaps, group):
    results, _ = swaps
    mine = {row: v for row, v in results.items() if v[0]["group"] == group}
    assert mine, group
    skipped = {row: e[0]["skipped"] for row, (_, e) in mine.items() if "skipped" in e[0]}
    failed = [f"{_name(case)}: {_verdict(entries)}" for case, entries in mine.values()
              if "skipped" not in entries[0] and _failures(entries)]
    assert not failed, "\n".join(failed)
    for case, entries in mine.values():
        if "skipped" not in entries[0]:
            assert sum(e["tensors"] for e in entries) > 0, _name(case)
    if len(skipped) == len(mine):
        pytest.skip("; ".join(f"row {row}: {why}" for row, why in skipped.items()))
    return mine


def _megatron_agrees(mine, buffers_ok):
    """Where megatron-core's refit ran, it landed our bits (buffers: only if `buffers_ok`)."""
    disagree = []
    for case, entries in mine.values():
        m = entries[0].get("megatron")
        if not m or not m["ran"]:
            continue
        differs = {n for e in entries for n in e["megatron"]["differs"]}
        if not buffers_ok(m["version"]):
            differs = {n for n in differs if not n.endswith("expert_bias")}
        if differs:
            disagree.append(f"{_name(case)}: {sorted(differs)[:4]}")
    assert not disagree, "\n".join(disagree)


def _buffers_refit(version: str) -> bool:
    """megatron-core refits persistent buffers from 0.17 on (0.16 copies parameters only)."""
    major, minor = (int(x) for x in version.split(".")[:2])
    return (major, minor) >= (0, 17)


def test_dense_layouts(swaps):
    """Rows 1-10: TP and PP changes of the dense GQA GPT."""
    mine = _check_group(swaps, "dense")
    _megatron_agrees(mine, _buffers_refit)


def test_moe_layouts(swaps):
    """Rows 11-20: EP, TP and PP changes of the 4-expert MoE GPT (expert TP = TP)."""
    _megatron_agrees(_check_group(swaps, "moe"), _buffers_refit)


def test_latent_moe_layouts(swaps):
    """Rows 21-23: latent MoE (moe_latent_size, shared experts, SwiGLU)."""
    _megatron_agrees(_check_group(swaps, "latent"), _buffers_refit)


def test_latent_moe_mtp_layouts(swaps):
    """Rows 24-26: latent MoE with one MTP layer (its experts too)."""
    mine = _check_group(swaps, "latent_mtp")
    for case, entries in mine.values():
        if "skipped" not in entries[0]:
            assert all(e["tensors"] for e in entries), _name(case)
    _megatron_agrees(mine, _buffers_refit)


def test_router_expert_bias_layouts(swaps):
    """Rows 27-29: every router's expert_bias (a persistent buffer) moves, in fp32."""
    mine = _check_group(swaps, "expert_bias")
    for case, entries in mine.values():
        for e in entries:
            biases = {n: d for n, d in e["buffers"].items() if n.endswith("expert_bias")}
            assert len(biases) == 2 and set(biases.values()) == {"torch.float32"}, \
                (_name(case), e["buffers"])
    _megatron_agrees(mine, _buffers_refit)


def test_router_expert_bias_non_collocated(swaps):
    """Row 30: source TP2 on ranks 0-1, destination TP2 on ranks 2-3, ranks 4-7 idle (None)."""
    mine = _check_group(swaps, "non_collocated")
    ((_, entries),) = mine.values()
    held = [rank for rank, e in enumerate(entries) if e["tensors"]]
    assert held == [2, 3], held
    for rank in held:
        biases = [d for n, d in entries[rank]["buffers"].items() if n.endswith("expert_bias")]
        assert biases == ["torch.float32"] * 2, entries[rank]["buffers"]
    _megatron_agrees(mine, _buffers_refit)


def test_bf16_layouts(swaps):
    """Ours: rows 1 and 15 with bf16 parameters (the router's expert_bias stays fp32)."""
    _megatron_agrees(_check_group(swaps, "bf16"), _buffers_refit)


@pytest.mark.parametrize("row,src,dst", MAMBA, ids=[f"row{r}" for r, _, _ in MAMBA])
def test_mamba_layouts(swaps, row, src, dst):
    """Rows 31-35: hybrid Mamba models (TP/PP changes, block-interleaved in_proj)."""
    _, reason = swaps
    pytest.skip(f"row {row} TP{src[0]}/PP{src[1]} -> TP{dst[0]}/PP{dst[1]}: {reason}")
