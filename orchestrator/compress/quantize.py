"""Per-output-channel symmetric weight quantization (ours: small and exact).

Each output row r gets scale_r = max|w_r| / qmax with qmax = 2^(bits-1) - 1, and values
q = clamp(round(w / scale_r), -qmax, qmax). The range is symmetric and restricted (no
-2^(bits-1)), so the row's largest magnitude gets the code ±qmax and every error is
at most half a step: |w - q * scale| <= scale / 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def qmax(bits: int) -> int:
    if bits < 2:
        raise ValueError(f"symmetric quantization needs at least 2 bits, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (same shape as `weight`, int8/int16) and one float32 scale per row."""
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    top = qmax(bits)
    scale = rows.abs().amax(dim=1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    codes = torch.clamp(torch.round(rows / scale[:, None]), -top, top)
    dtype = torch.int8 if bits <= 8 else torch.int16
    return codes.to(dtype).reshape(weight.shape), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = codes.reshape(codes.shape[0], -1).float() * scale[:, None]
    return rows.reshape(codes.shape).to(dtype)


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The float tensor the quantized model computes with (what scoring uses): exactly
    `dequantize(*quantize(weight, bits))`, without the integer round trip."""
    return fake_quantize_(weight.detach().float().clone(), bits).to(weight.dtype)


@torch.no_grad()
def fake_quantize_many(weight: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """`fake_quantize(weight, b)` for each b in `bits`, stacked along a new first dimension,
    in the torch ops of one: the same element-wise ops, so bit for bit the same values.
    For a small tensor an op's dispatch costs more than its arithmetic (issue 3: the
    rebuild), so the rebuild quantizes it at every bits its layer may take at once."""
    if len(bits) == 1:
        return fake_quantize(weight, bits[0]).unsqueeze(0)
    rows = weight.detach().reshape(1, weight.shape[0], -1).float()
    tops = torch.tensor([float(qmax(b)) for b in bits], device=weight.device).view(-1, 1, 1)
    scale = rows.abs().amax(dim=2, keepdim=True) / tops
    scale.masked_fill_(scale == 0, 1.0)  # an all-zero row stays zero
    codes = (rows / scale).round_()
    torch.minimum(codes, tops, out=codes)  # clamp_ with tensor bounds is many times slower
    torch.maximum(codes, -tops, out=codes)
    return codes.mul_(scale).reshape(len(bits), *weight.shape).to(weight.dtype)


@torch.no_grad()
def fake_quantize_(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`fake_quantize` in place, for a float32 tensor the caller owns (the rebuild's)."""
    rows = weight.view(weight.shape[0], -1)
    top = qmax(bits)
    scale = rows.abs().amax(dim=1, keepdim=True).div_(top)
    scale.masked_fill_(scale == 0, 1.0)  # an all-zero row stays zero
    rows.div_(scale).round_().clamp_(-top, top).mul_(scale)
    return weight
