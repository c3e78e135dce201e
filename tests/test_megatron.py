"""refit_engine on megatron-core Kimi K2 models (toy size, CPU, gloo), bit-exact, and
megatron-core's own refit against ours on the same models."""

import pytest

pytest.importorskip("megatron.core")

from multiproc import run_world  # noqa: E402

# (name, source layout, destination layout, non-collocated) on 4 ranks.
CASES = [
    ("TP2->TP1", dict(tp=2), dict(tp=1), False),
    ("TP1->TP2", dict(tp=1), dict(tp=2), False),
    ("TP2/EP2->TP1/EP4 (experts move)", dict(tp=2, ep=2), dict(tp=1, ep=4), False),
    ("ETP2->ETP1", dict(tp=2, ep=2, etp=2), dict(tp=2, ep=2, etp=1), False),
    ("PP2->PP1", dict(tp=2, pp=2), dict(tp=2), False),
    ("combined TP2/PP2/EP2 -> TP4/EP4", dict(tp=2, pp=2, ep=2), dict(tp=4, ep=4), False),
    ("non-collocated TP2/EP2 on 0-1 -> TP1/EP2 on 2-3", dict(tp=2, ep=2), dict(tp=1, ep=2), True),
]


def _cases_worker(rank, world, cases, with_megatron):
    import warnings

    import torch

    import refit_engine
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.harness.baselines.megatron_refit import megatron_refit
    from refit_engine.verify import check_exact
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = KimiK2Config.toy(num_layers=3, num_experts=8)
    report = {}
    for name, src_spec, dst_spec, separate in cases:
        src_ranks = (0, 1) if separate else tuple(range(world))
        dst_ranks = (2, 3) if separate else tuple(range(world))
        src_layout = ParallelGrid(len(src_ranks), **src_spec, offset=src_ranks[0])
        dst_layout = ParallelGrid(len(dst_ranks), **dst_spec, offset=dst_ranks[0])
        src_pgs, dst_pgs = build_process_groups(src_layout), build_process_groups(dst_layout)
        src = build_kimi_k2(cfg, src_layout, src_pgs, seed=11) or None
        dst = build_kimi_k2(cfg, dst_layout, dst_pgs, seed=22) or None

        def poison():
            for chunk in dst or []:
                for t in list(chunk.parameters()) + list(chunk.buffers()):
                    t.data.view(torch.uint8).fill_(0xA5)
        poison()
        if name.startswith("PP2"):  # the drop-in entry point, twice (plans once, then reuses)
            from refit_engine.megatron import swap_model_weights
            swap_model_weights(src, dst, refit_method="gloo")
            poison()
            swap_model_weights(src, dst, refit_method="gloo")
            from refit_engine.megatron import cached_plan
            plan = cached_plan(src, dst)
            assert plan.refits == 2
        else:
            plan = refit_engine.plan(src, dst, timeout_s=60)
            refit_engine.execute(plan)
        ours = check_exact(plan)
        entry = {"ours_wrong": ours, "tensors": len(plan.dst_tensors)}
        if with_megatron:
            poison()
            megatron_refit(src, dst, src_pgs, dst_pgs, method="gloo")
            entry["megatron_wrong"] = check_exact(plan)
        report[name] = entry
    return report


def test_toy_kimi_k2_refits_bit_exact():
    reports = run_world(_cases_worker, 4, CASES, False, timeout=600)
    for rank, report in enumerate(reports):
        for name, entry in report.items():
            assert entry["ours_wrong"] == [], (rank, name, entry["ours_wrong"][:5])
    assert sum(r[CASES[0][0]]["tensors"] for r in reports) > 0


def test_megatron_refit_matches_ours():
    # Layouts megatron-core 0.16 refits correctly (expert TP = TP with EP1: see
    # megatron_refit.megatron_refit's checks): a TP change and a PP change, collocated.
    cases = [("TP2/ETP2->TP1", dict(tp=2, etp=2), dict(tp=1), False),
             ("TP2/ETP2/PP2->TP2/ETP2", dict(tp=2, etp=2, pp=2), dict(tp=2, etp=2), False)]
    reports = run_world(_cases_worker, 4, cases, True, timeout=600)
    for rank, report in enumerate(reports):
        for name, entry in report.items():
            assert entry["ours_wrong"] == [], (rank, name)
            # megatron-core 0.16 does not move persistent buffers (router.expert_bias).
            wrong = [t for t in entry["megatron_wrong"] if not t.endswith("expert_bias")]
            assert wrong == [], (rank, name, wrong[:5])


def _names_worker(rank, world):
    import warnings

    from refit_engine.megatron import describe
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = KimiK2Config.toy(num_layers=4, num_experts=8)
    layout = ParallelGrid(world, tp=1, pp=2, ep=2)
    model = build_kimi_k2(cfg, layout, build_process_groups(layout), seed=3)
    return sorted({(e.name, e.start, e.extent) for e in describe(model).entries
                   if ".experts." in e.name and "shared" not in e.name or "layers." in e.name
                   and e.name.endswith("input_layernorm.weight")})


def test_canonical_names_follow_megatron_rank_order():
    """Independent of the adapter: expert and layer placement from ParallelGrid's rank math."""
    from refit_engine.harness.grid import ParallelGrid
    per_rank = run_world(_names_worker, 4)
    grid = ParallelGrid(4, pp=2, ep=2)
    for rank, names in enumerate(per_rank):
        stage = rank // 2
        layers = set(grid.stage_layers(4, stage))
        got_layers = {int(n.split(".")[2]) for n, _, _ in names}
        assert got_layers == layers, (rank, got_layers)
        experts = {int(n.split(".")[5]) for n, _, _ in names if ".experts." in n}
        want = {e for e in range(8) if any(r == rank for r, _, _ in
                                             grid.expert_holders(e, 8, stage))}
        assert experts == want, (rank, experts, want)


def _standard_attention_worker(rank, world):
    import warnings

    import refit_engine
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.harness.baselines.megatron_refit import megatron_refit
    from refit_engine.verify import check_exact
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = KimiK2Config.toy(num_layers=2, num_experts=4)
    gqa = dict(multi_latent_attention=False, num_query_groups=2)  # fused linear_qkv, GQA
    s, d = ParallelGrid(world, tp=2, etp=2), ParallelGrid(world, tp=1)
    sp, dp = build_process_groups(s), build_process_groups(d)
    src, dst = build_kimi_k2(cfg, s, sp, seed=1, **gqa), build_kimi_k2(cfg, d, dp, seed=2, **gqa)
    plan = refit_engine.plan(src, dst)
    refit_engine.execute(plan)
    ours = check_exact(plan)
    for t in dst[0].parameters():
        t.data.zero_()
    megatron_refit(src, dst, sp, dp, method="gloo")
    return ours, [k for k in check_exact(plan) if not k.endswith("expert_bias")], \
        any("linear_qkv" in n for n, _ in src[0].named_parameters())


def test_standard_attention_gqa_refits_like_megatron():
    for ours, megatron, has_qkv in run_world(_standard_attention_worker, 2):
        assert has_qkv and ours == [] and megatron == []


def _devices_worker(rank, world):
    import warnings

    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    warnings.filterwarnings("ignore", category=UserWarning)
    layout = ParallelGrid(world, tp=1, ep=2)
    model = build_kimi_k2(KimiK2Config.toy(num_layers=2, num_experts=4), layout,
                          build_process_groups(layout), seed=1, mtp_num_layers=1)
    return sorted({str(t.device) for t in list(model[0].parameters()) + list(model[0].buffers())})


def test_cpu_models_hold_only_cpu_tensors():
    # On a CUDA host megatron puts the router's buffers on the current GPU whatever
    # use_cpu_initialization says: a "cpu" model must still be CPU only (or plans refuse it).
    for devices in run_world(_devices_worker, 2):
        assert devices == ["cpu"], devices
