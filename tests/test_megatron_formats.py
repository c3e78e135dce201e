"""The drop-in's destination formats (issue 16): `swap_model_weights(..., formats=, cast=)`.

A toy Kimi K2 (MLA, MoE, bf16 parameters, fp32 expert_bias) on 2 gloo ranks, source TP2/EP1
-> destination TP1/EP2 (collocated), formats="kimi_k2": every quantized output
(`quantized_weights`) must hold exactly `refit_engine.quantize.transform` of the source's
global tensor (each destination parameter is the whole tensor at TP1), scales included, bit
for bit, with the outputs poisoned first; the quantized parameters themselves stay unwritten
and every other tensor lands the source's bits. The expected values come from the source's
seed (`_canonical_values`) and this file's own naming (global expert = EP rank * 2 + local).
A second swap after new source values reuses the plan and the same output tensors; other
formats (MXFP8 experts) and a replaced parameter plan again; cast=True fills a float32 model
from the bf16 source. Rules that leave a parameter without a format, plain rules unlike the
model's dtype and a destination shard that cuts a block are refused on every rank, naming the
tensor.

The same worker on ONE GPU (`device="cuda:0"`): both rank processes build their models on
cuda:0 (as tests/test_ipc.py's megatron worker), so transport="auto" joins them with CUDA IPC
only; the prepared swap, check_exact, the second swap (plan reused, new values), two swaps
with graph=True (captured, then replayed with new source values) and the MXFP8 experts swap
are checked the same way, the FP8 outputs copied to the host for the comparison. Skipped
without a CUDA GPU or a CUDA build of refit_engine.
"""

import pytest

pytest.importorskip("megatron.core")

import gpu_check
from megatron_check import POISON, count_plans, poison
from multiproc import run_world

SRC_SEED, NEW_SEED = 11, 33
GRAPH_SEEDS = (44, 55)  # the GPU run's graph=True swaps: captured, then replayed
EXPERTS = 4


def _canonical(name: str, rank: int, ep: int) -> str:
    """Canonical name of a destination parameter at TP1/PP1/EP `ep` (ETP1: EP index = rank)."""
    import re
    m = re.search(r"\.experts\.local_experts\.(\d+)\.", name)
    if m:
        expert = (rank % ep) * (EXPERTS // ep) + int(m[1])
        name = f"{name[:m.start()]}.experts.{expert}.{name[m.end():]}"
    return name


def _bits(tensor):
    import numpy as np
    import torch
    t = tensor.detach().cpu().contiguous()  # a CUDA tensor compared on the host
    view = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32),
            torch.float8_e4m3fn: (torch.uint8, np.uint8), torch.uint8: (torch.uint8, np.uint8)}
    as_torch, as_numpy = view[t.dtype]
    return t.view(as_torch).numpy().view(as_numpy)


def _global(canonical: str, shape, seed: int):
    """The source's global tensor (bf16; expert_bias fp32) drawn from `seed`."""
    import torch

    from refit_engine.harness.models.megatron_builder import _canonical_values
    dtype = torch.float32 if canonical.endswith("expert_bias") else torch.bfloat16
    return _canonical_values(canonical, tuple(shape), seed).to(dtype)


def _poison_outputs(outputs):
    import torch
    for data, scale in outputs.values():
        data.view(torch.uint8).fill_(POISON)
        scale.view(torch.uint8).fill_(POISON)


def _check(dst, rank, seed, rules, outputs):
    """(names wrong, quantized names, plain names) of this rank's destination (TP1, EP2)."""
    import numpy as np
    import torch

    from refit_engine import quantize
    wrong, quantized, plain = [], [], []
    for name, param in dst[0].named_parameters():
        canonical = _canonical(name, rank, 2)
        full = _global(canonical, param.shape, seed)
        fmt = quantize.format_for(canonical, rules)
        if fmt in quantize.QUANTIZED:
            quantized.append(name)
            q, s = quantize.transform(_bits(full), "bf16", fmt)
            data, scale = outputs.get(name, (None, None))
            if data is None or not (np.array_equal(_bits(data), q)
                                    and np.array_equal(_bits(scale), s.view(_bits(scale).dtype))):
                wrong.append(name)
            if not bool((param.data.view(torch.uint8) == POISON).all()):
                wrong.append(f"{name} (parameter written)")
            continue
        plain.append(name)
        if not np.array_equal(_bits(param), _bits(full.to(param.dtype))):
            wrong.append(name)
    for name, buf in dst[0].named_buffers():
        if name.endswith("expert_bias"):
            plain.append(name)
            if not np.array_equal(_bits(buf), _bits(_global(_canonical(name, rank, 2),
                                                            buf.shape, seed))):
                wrong.append(name)
    return wrong, quantized, plain


def _refused(call):
    from refit_engine import RefitError
    try:
        call()
    except RefitError as exc:
        return exc.tensor, tuple(exc.ranks), exc.reason
    return None


def _worker(rank, world, device="cpu"):
    """The drop-in's formats on this rank, models on `device`: "cpu" (gloo) or "cuda:0" (every
    rank process on the one GPU: CUDA IPC; the GPU run stops after the MXFP8 swap)."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from refit_engine import quantize
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.main_job import place_on
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.models.megatron_builder import (
        _canonical_init,
        build_kimi_k2,
        build_process_groups,
    )
    from refit_engine.megatron import (
        cached_plan,
        clear_all_caches,
        prepare_swap_model_weights,
        quantized_weights,
        swap_model_weights,
    )
    from refit_engine.verify import check_exact
    _, planned = count_plans()
    gpu = device != "cpu"
    method = "nccl" if gpu else "gloo"  # megatron-core's name; the tensors choose the executor
    if gpu:
        torch.cuda.set_device(0)

    def build(config, grid, pgs, seed):
        if not gpu:
            return build_kimi_k2(config, grid, pgs, seed=seed)
        # the local spec (this file's naming), as on the GPU machines (no Transformer Engine)
        chunks = build_kimi_k2(config, grid, pgs, device=device, seed=seed,
                               use_transformer_engine=False)
        place_on(chunks, device)  # megatron leaves some buffers elsewhere: all on cuda:0
        return chunks

    def settle():  # values and poison written on this rank's stream, done before a swap
        if gpu:
            torch.cuda.synchronize()

    kimi = quantize.KIMI_K2_FORMATS
    cfg = KimiK2Config.toy(num_layers=2, num_experts=EXPERTS)
    s, d = ParallelGrid(world, tp=2), ParallelGrid(world, tp=1, ep=2)
    spg, dpg = build_process_groups(s), build_process_groups(d)
    src = build(cfg, s, spg, SRC_SEED)
    dst = build(cfg, d, dpg, 22)
    out = {}

    # prepare allocates the outputs (unwritten); the swap reuses its plan and fills them
    prepare_swap_model_weights(src, dst, formats="kimi_k2", timeout_s=60)
    outputs = quantized_weights(dst)
    poison(dst)
    _poison_outputs(outputs)
    settle()
    swap_model_weights(src, dst, method, formats="kimi_k2", timeout_s=60)
    out["first"] = _check(dst, rank, SRC_SEED, kimi, outputs)
    out["names"] = sorted(outputs) == sorted(quantized_weights(dst))
    out["plans first"] = len(planned)
    plan = cached_plan(src, dst, formats="kimi_k2", timeout_s=60)
    out["check_exact"] = check_exact(plan)
    out["plans exact"] = len(planned)
    if gpu:
        out["transports"] = sorted(set(plan.peer_transports.values()))
        out["bytes_ipc"] = plan.traffic.get("bytes_ipc") or 0

    # new source values: the cached plan, the same output tensors, the new values
    _canonical_init(src, NEW_SEED)
    seed = NEW_SEED
    poison(dst)
    _poison_outputs(outputs)
    settle()
    swap_model_weights(src, dst, method, formats=list(kimi), timeout_s=60)  # the same rules
    out["second"] = _check(dst, rank, seed, kimi, outputs)
    again = quantized_weights(dst)
    out["same tensors"] = all(again[n][0] is outputs[n][0] and again[n][1] is outputs[n][1]
                              for n in outputs) and len(again) == len(outputs)
    out["plans second"] = len(planned)

    if gpu:  # the cached plan as a CUDA graph: captured, then replayed with new source values
        for step, seed in zip(("graph", "graph replay"), GRAPH_SEEDS):
            _canonical_init(src, seed)
            poison(dst)
            _poison_outputs(outputs)
            settle()
            swap_model_weights(src, dst, method, formats="kimi_k2", graph=True, timeout_s=60)
            out[step] = _check(dst, rank, seed, kimi, outputs)
        out["plans graph"] = len(planned)

    # other formats: routed experts in MXFP8 (new outputs for them), a new plan
    mx = ((r"\.experts\.\d+\.linear_fc\d\.weight$", "mxfp8"),) + kimi
    mine = quantized_weights(dst)
    poison(dst)
    _poison_outputs(mine)
    settle()
    swap_model_weights(src, dst, method, formats=mx, timeout_s=60)
    mine = quantized_weights(dst)
    out["mxfp8"] = _check(dst, rank, seed, mx, mine)
    out["mxfp8 scales"] = sorted({str(scale.dtype) for _, scale in mine.values()})
    out["plans mxfp8"] = len(planned)
    if gpu:  # as tests/test_ipc.py: the plans (their IPC mappings) closed, then a barrier
        clear_all_caches()
        dist.barrier()
        return out

    # a quantized parameter replaced on its module: planned again, new outputs for it
    attention = dst[0].decoder.layers[0].self_attention.linear_proj
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    old = mine[name][0]
    attention.weight = torch.nn.Parameter(attention.weight.detach().clone())
    mine = quantized_weights(dst)
    out["replaced dropped"] = name not in mine
    poison(dst)
    _poison_outputs(mine)
    swap_model_weights(src, dst, "gloo", formats=mx, timeout_s=60)
    mine = quantized_weights(dst)
    out["replaced"] = _check(dst, rank, NEW_SEED, mx, mine)
    out["replaced new"] = mine[name][0] is not old
    out["plans replaced"] = len(planned)

    # cast=True into a float32 model, linear weights quantized from the bf16 source
    dst32 = build_kimi_k2(dataclasses.replace(cfg, dtype="float32"), d, dpg, seed=22)
    rules32 = ((r"\.linear_\w+\.weight$", "fp8_block128"), (r".", "fp32"))
    poison(dst32)
    swap_model_weights(src, dst32, "gloo", formats=rules32, cast=True, timeout_s=60)
    out["cast"] = _check(dst32, rank, NEW_SEED, rules32, quantized_weights(dst32))

    # refusals, on every rank, before any byte moves
    poison(dst)
    no_output_rule = tuple(r for r in kimi if "output_layer" not in r[0])
    out["unmatched"] = _refused(lambda: swap_model_weights(src, dst, "gloo",
                                                           formats=no_output_rule, timeout_s=60))
    fp32_norms = ((r"norm\.weight$", "fp32"),) + kimi
    out["plain dtype"] = _refused(lambda: swap_model_weights(src, dst, "gloo",
                                                             formats=fp32_norms, timeout_s=60))
    out["untouched"] = all(bool((t.data.view(torch.uint8) == POISON).all())
                           for t in dst[0].parameters())
    dst_tp2 = build_kimi_k2(cfg, s, spg, seed=22)  # TP2 shards of 16 or 48 cut 128 x 128 blocks
    out["cut"] = _refused(lambda: swap_model_weights(src, dst_tp2, "gloo", formats="kimi_k2",
                                                     timeout_s=60))
    out["bad formats"] = _refused(lambda: swap_model_weights(src, dst, "gloo", formats="fp8"))
    return out


def _check_steps(rank, out, steps):
    """Every step's FP8 outputs and plain parameters right, names and tensors kept, the whole
    refit exact, and prepare's one plan."""
    for step in steps:
        wrong, quantized, plain = out[step]
        assert wrong == [], (rank, step, wrong[:5])
        assert quantized and plain, (rank, step)
    assert out["names"] and out["same tensors"], rank
    assert out["check_exact"] == [], (rank, out["check_exact"][:5])
    assert out["plans first"] == 1 and out["plans exact"] == 1, out  # prepare's plan


def test_formats_through_the_drop_in():
    per_rank = run_world(_worker, 2, timeout=300)
    for rank, out in enumerate(per_rank):
        _check_steps(rank, out, ("first", "second", "mxfp8", "replaced", "cast"))
        assert out["plans second"] == 1, out  # reused
        assert out["plans mxfp8"] == 2, out  # formats key the cache
        assert out["mxfp8 scales"] == ["torch.float32", "torch.uint8"], out
        assert out["replaced dropped"] and out["replaced new"], rank
        assert out["plans replaced"] == 3, out  # the replaced parameter made the plan stale
        tensor, ranks, reason = out["unmatched"]
        assert tensor == "output_layer.weight" and "no rule matches" in reason, out["unmatched"]
        assert ranks, out["unmatched"]
        tensor, ranks, reason = out["plain dtype"]
        assert tensor.endswith("norm.weight") and "fp32" in reason and "bfloat16" in reason, \
            out["plain dtype"]
        assert ranks and out["untouched"], (rank, out["plain dtype"])
        tensor, ranks, reason = out["cut"]
        assert "cuts a block" in reason and tensor and ranks, out["cut"]
        assert "presets" in out["bad formats"][2], out["bad formats"]
    for name in ("unmatched", "plain dtype", "cut"):  # the same error on every rank
        assert per_rank[0][name] == per_rank[1][name], name


@pytest.mark.gpu
@pytest.mark.skipif(gpu_check.skip_reason() is not None,
                    reason=gpu_check.skip_reason() or "")
def test_formats_through_the_drop_in_on_one_gpu():
    """The drop-in's formats with megatron-core models on cuda:0 in both rank processes (CUDA
    IPC): prepared swap, reused plan with new values, graph capture and replay, MXFP8 experts;
    every FP8 output bit-exact against refit_engine.quantize, the rest the source's bits."""
    per_rank = run_world(_worker, 2, "cuda:0", timeout=300)
    for rank, out in enumerate(per_rank):
        _check_steps(rank, out, ("first", "second", "graph", "graph replay", "mxfp8"))
        assert set(out["transports"]) <= {"ipc"}, (rank, out["transports"])
        assert out["plans second"] == 1 and out["plans graph"] == 1, out  # reused
        assert out["plans mxfp8"] == 2, out  # formats key the cache
        assert out["mxfp8 scales"] == ["torch.float32", "torch.uint8"], out
    assert sum(out["bytes_ipc"] for out in per_rank) > 0, "nothing moved over CUDA IPC"
