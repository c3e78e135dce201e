"""The receiver-side way to block FP8, as a refit that lands BF16 would run it: torch ops per
weight (amax per 128 x 128 block, divide, clamp, cast). The baseline of bench/transform_kernels.py
and bench/loopback_fp8.py; close to refit_engine.quantize but not bit-identical at its edges
(NaN, zero blocks' rounding of the scale)."""

from __future__ import annotations

import torch


def block_quantize(x: torch.Tensor, out: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None):
    """(e4m3 data, float32 scale_inv per block) of one 2-D tensor; written into `out` and
    `scale` when given."""
    r, c = x.shape
    pr, pc = -(-r // 128) * 128, -(-c // 128) * 128
    padded = torch.nn.functional.pad(x.float(), (0, pc - c, 0, pr - r))
    blocks = padded.view(pr // 128, 128, pc // 128, 128)
    amax = blocks.abs().amax(dim=(1, 3))
    s = torch.where(amax == 0, torch.ones_like(amax), amax / 448.0)
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = q.view(pr, pc)[:r, :c]
    if out is not None:
        out.copy_(q)
    if scale is not None:
        scale.copy_(s)
    return q, s
