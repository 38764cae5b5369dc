"""INT4 weight-only (W4A16) linear products' weight layout and numerics in PyTorch alone (no Triton: what a
CPU runs; the kernels in `tensorjet.kernels.int4_linear` compute the same products).

`Int4Weight` is tensorjet's layout (from `tensorjet.quant.int4_packing`): `qweight` int32
[N, ceil(K / 8)] with the code of column k at bits 4 (k % 8) of word k // 8; `scales` [N, groups] in
the activation dtype and `zeros` uint8 [N, groups] (None: every zero point is 8, a symmetric format),
one each per `group_size` columns; `perm` int32 [K] or None: stored column j multiplies input column
perm[j] (GPTQ's act order, its groups made contiguous at load). The reference: w = (code - zero) *
scale in fp32, rounded to x's dtype, then x @ w^T with fp32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Int4Weight:
    """A linear layer's 4-bit weight in tensorjet's layout (see the module docstring)."""

    qweight: torch.Tensor  # int32 [N, ceil(K / 8)]
    scales: torch.Tensor  # [N, groups], the activation dtype
    zeros: torch.Tensor | None  # uint8 [N, groups]; None: 8 everywhere
    perm: torch.Tensor | None  # int32 [K]; None: stored column j is input column j
    group_size: int  # a multiple of 8; one group per row (per channel): K rounded up to 8
    in_features: int  # K

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]


def dequantize(
    weight: Int4Weight, dtype: torch.dtype = torch.float32, stored_order: bool = False
) -> torch.Tensor:
    """W [N, K] = (code - zero) * scale computed in fp32 and rounded to `dtype`; its columns in input
    order (act order undone), or as stored with `stored_order`."""
    n, k = weight.out_features, weight.in_features
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=weight.qweight.device)
    codes = ((weight.qweight[:, :, None] >> shifts) & 0xF).reshape(n, -1)[:, :k].float()
    groups = torch.arange(k, device=codes.device) // weight.group_size
    zeros = 8.0 if weight.zeros is None else weight.zeros.float()[:, groups]
    w = ((codes - zeros) * weight.scales.float()[:, groups]).to(dtype)
    if weight.perm is None or stored_order:
        return w
    dense = torch.empty_like(w)
    dense[:, weight.perm.long()] = w
    return dense


def int4_linear_reference(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ dequantize(weight)^T (+ bias) in x's dtype."""
    return F.linear(x, dequantize(weight, x.dtype), bias)
