"""PyTorch's own INT4 weight-only product, "tinygemm" (`aten._weight_int4pack_mm`: gpt-fast's and
torchao's INT4 path), over a layer's `Int4Weight` repacked once into the kernel's layout.

tinygemm computes w = (code - 8) * scale + zero per group, with bf16 scales and zeros [groups, N, 2].
tensorjet's weights are w = (code - z) * scale, so its zero is (8 - z) * scale, rounded to bf16 (where
z is 8, a symmetric format, it is exactly 0). Act order: x's columns are gathered into stored order
first (`x[:, perm]`), as the stored codes multiply them. x runs in bf16 (the kernel's only dtype).

The CPU has the same product with its own packing (`_convert_weight_to_int4pack_for_cpu`,
`_weight_int4pack_mm_for_cpu`, the same numerics), so the layout conversion is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorjet.kernels.int4_reference import Int4Weight

__all__ = ["TinygemmWeight", "pack_tinygemm", "tinygemm_bytes", "tinygemm_linear", "tinygemm_unsupported"]

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernel takes
INNER_K_TILES = 8  # the CUDA packing's K tiles per inner loop: K must be a multiple of 16 of them
ROWS_MULTIPLE = 16  # both packings take output rows in multiples of 16


@dataclass(frozen=True)
class TinygemmWeight:
    """A linear layer's 4-bit weight in tinygemm's layout for the device it lies on."""

    packed: torch.Tensor  # the kernel's opaque int32 tiles
    scales_and_zeros: torch.Tensor  # bf16 [groups, N, 2]
    perm: torch.Tensor | None  # int64 [K]: stored column j multiplies input column perm[j]
    group_size: int
    in_features: int
    out_features: int


def tinygemm_unsupported(weight: Int4Weight, dtype: torch.dtype) -> str | None:
    """Why tinygemm cannot run this weight with activations of `dtype` (None: it can)."""
    n, k = weight.out_features, weight.in_features
    if dtype != torch.bfloat16:
        return f"activations in {dtype} (tinygemm runs bf16)"
    if weight.group_size not in GROUP_SIZES:
        return f"group size {weight.group_size} (tinygemm takes {GROUP_SIZES})"
    if k % (16 * INNER_K_TILES):
        return f"{k} input columns (tinygemm takes multiples of {16 * INNER_K_TILES})"
    if n % ROWS_MULTIPLE:
        return f"{n} output rows (tinygemm takes multiples of {ROWS_MULTIPLE})"
    return None


def tinygemm_bytes(weight: Int4Weight) -> int:
    """The memory `pack_tinygemm(weight)` takes: half a byte per code, bf16 scale and zero per group."""
    n, k = weight.out_features, weight.in_features
    return n * k // 2 + 4 * n * -(-k // weight.group_size)


def pack_tinygemm(weight: Int4Weight) -> TinygemmWeight:
    """`weight` in tinygemm's layout, on its device."""
    reason = tinygemm_unsupported(weight, torch.bfloat16)
    if reason is not None:
        raise ValueError(f"tinygemm cannot run this INT4 weight: {reason}")
    n, k, group = weight.out_features, weight.in_features, weight.group_size
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=weight.qweight.device)
    codes = ((weight.qweight[:, :, None] >> shifts) & 0xF).reshape(n, -1)[:, :k]  # int32 [N, K], stored order
    if weight.qweight.device.type == "cuda":
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # even column in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), INNER_K_TILES)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scales = weight.scales.float()  # [N, groups]
    zero_points = 8.0 if weight.zeros is None else weight.zeros.float()
    zeros = (8.0 - zero_points) * scales
    scales_and_zeros = torch.stack((scales.T, zeros.T), dim=-1).to(torch.bfloat16).contiguous()
    perm = None if weight.perm is None else weight.perm.long()
    return TinygemmWeight(packed, scales_and_zeros, perm, group, k, n)


def tinygemm_linear(
    x: torch.Tensor, weight: TinygemmWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) in x's dtype through tinygemm. No host synchronisation; CUDA-graph safe."""
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x must be [M, {weight.in_features}]; got {tuple(x.shape)}")
    xb = x.to(torch.bfloat16)
    if weight.perm is not None:
        xb = xb.index_select(1, weight.perm)
    xb = xb.contiguous()
    if x.device.type == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(xb, weight.packed, weight.group_size, weight.scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, weight.packed, weight.group_size, weight.scales_and_zeros
        )
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)
