"""The FP8 (E4M3) W8A8 product's numerics in PyTorch alone (no Triton: what a CPU runs, and what every
kernel in `tensorjet.kernels.fp8_linear` computes bit for bit but for the order of its sums): the
weight quantized per output channel, the activation per token (its row's absolute maximum maps to 448)
or by a checkpoint's static scale, and an fp32 epilogue.
"""

from __future__ import annotations

import torch

from tensorjet.dtypes import FP8_MAX

E4M3 = torch.float8_e4m3fn
MIN_AMAX = 1e-12  # a row of zeros gets this absolute maximum: a finite scale, an all-zero row


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    """max(amax, 1e-12) / 448 in float32, correctly rounded on every device: CUDA torch divides a
    tensor by a Python number as a multiplication by its reciprocal (off by an ulp at times), so
    the divisor is a tensor (a fill: no host copy, CUDA-graph safe)."""
    amax = amax.float().clamp(min=MIN_AMAX)
    return amax / torch.full_like(amax, FP8_MAX)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] as E4M3 [N, K] and its per-output-channel float32 scale [N]."""
    scale = scale_for(w.abs().amax(dim=1))
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale


def quantize_per_token(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as E4M3 [M, K] and its float32 scale per row [M, 1]: each row's absolute maximum over
    448, or the static `input_scale` (a float32 scalar) for every row."""
    if input_scale is None:
        x_scale = scale_for(x.abs().amax(dim=-1, keepdim=True))
    else:
        x_scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), x_scale


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] * weight_scale [N, 1])^T (+ bias) with x quantized per token (or by
    `input_scale`), in x's dtype. `weight` is E4M3 or a float tensor holding E4M3 values (kept by a
    CPU path that would otherwise convert it on every call): both give the same result."""
    xq, x_scale = quantize_per_token(x, input_scale)
    y = (xq.float() @ weight.float().T) * x_scale * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
