"""Multi-token-prediction (MTP) layers of a toy Kimi K2 (MoE) refit bit-exact across EP changes:
their routed experts are named by global expert index like the decoder's."""

import pytest

pytest.importorskip("megatron.core")

from multiproc import run_world  # noqa: E402

NUM_EXPERTS = 8
CASES = [  # (name, source layout, destination layout) on 4 ranks; destinations have etp=1
    ("EP2/TP2 -> EP4 (experts move)", dict(tp=2, ep=2), dict(tp=1, ep=4)),
    ("EP1/ETP2 -> EP4", dict(tp=2, etp=2), dict(tp=1, ep=4)),
    # As many local experts on both sides, but other ones: wrong without a refusal when
    # experts are matched by local index.
    ("EP2/ETP2 -> EP2/ETP1 (experts change ranks)", dict(tp=2, ep=2, etp=2),
     dict(tp=2, ep=2, etp=1)),
]


def _mtp_worker(rank, world, cases):
    import warnings

    import torch

    import refit_engine
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.megatron_builder import (_canonical_values, build_kimi_k2,
                                                              build_process_groups)
    from refit_engine.verify import check_exact
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = KimiK2Config.toy(num_layers=2, num_experts=NUM_EXPERTS)
    report = {}
    for name, src_spec, dst_spec in cases:
        src_layout, dst_layout = ParallelGrid(world, **src_spec), ParallelGrid(world, **dst_spec)
        src = build_kimi_k2(cfg, src_layout, build_process_groups(src_layout), seed=11,
                            mtp_num_layers=1)
        dst_pgs = build_process_groups(dst_layout)
        dst = build_kimi_k2(cfg, dst_layout, dst_pgs, seed=22, mtp_num_layers=1)
        for t in list(dst[0].parameters()) + list(dst[0].buffers()):
            t.data.view(torch.uint8).fill_(0xA5)
        plan = refit_engine.plan(src, dst, timeout_s=60)
        refit_engine.execute(plan)
        # Independent of the adapter's naming: this rank's MTP expert k is global expert
        # ep_rank * local + k (megatron's rank order: with etp=1, EP is fastest: ep_rank =
        # rank % ep); with etp=1 it is whole, the source's canonical draw of that expert.
        local = NUM_EXPERTS // dst_layout.ep
        ep_rank = rank % dst_layout.ep
        assert ep_rank == dst_pgs.ep.rank()
        misplaced, checked = [], 0
        for pname, param in dst[0].named_parameters():
            if not pname.startswith("mtp.") or ".local_experts." not in pname:
                continue
            head, tail = pname.split(".local_experts.")
            k, rest = tail.split(".", 1)
            expert = ep_rank * local + int(k)
            want = _canonical_values(f"{head}.{expert}.{rest}", tuple(param.shape), 11)
            checked += 1
            if not torch.equal(param.detach(), want.to(param.dtype)):
                misplaced.append(pname)
        report[name] = {"wrong": check_exact(plan), "misplaced": misplaced, "checked": checked,
                        "mtp": sum(1 for n, _ in dst[0].named_parameters()
                                   if n.startswith("mtp."))}
    return report


def test_mtp_experts_refit_bit_exact_across_ep_changes():
    for rank, report in enumerate(run_world(_mtp_worker, 4, CASES, timeout=600)):
        for name, entry in report.items():
            assert entry["mtp"] > 0 and entry["checked"] > 0, (rank, name)
            assert entry["wrong"] == [], (rank, name, entry["wrong"][:5])
            assert entry["misplaced"] == [], (rank, name, entry["misplaced"][:5])
