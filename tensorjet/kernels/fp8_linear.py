"""FP8 (E4M3) W8A8 linear products: per-channel weight scales, per-token (or static) activation scales.

`fp8_linear_reference` is the arithmetic every FP8 kernel follows (the CPU runs it); `scaled_mm_linear`
runs it on an FP8 GPU through `torch._scaled_mm` with row-wise scales.
"""

from __future__ import annotations

import torch

from tensorjet.dtypes import FP8_MAX

E4M3 = torch.float8_e4m3fn
MIN_AMAX = 1e-12


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().amax(dim=1).float().clamp(min=MIN_AMAX)
    scale = amax / FP8_MAX
    wq = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return wq, scale


def quantize_per_token(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if input_scale is None:
        scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=MIN_AMAX) / FP8_MAX
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    xq = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return xq, scale


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    xq, x_scale = quantize_per_token(x, input_scale)
    y = (xq.float() @ weight.float().t()) * x_scale * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def scaled_mm_linear(x, weight, weight_scale, bias=None, input_scale=None):
    xq, x_scale = quantize_per_token(x, input_scale)
    return torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), bias=bias, out_dtype=x.dtype
    )
