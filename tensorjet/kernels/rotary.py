"""Rotary position embedding applied in place to q and k in one launch.

Rotate-half layout (HF Llama/Mistral/Qwen): with x = [x1 | x2] split at half the head dim,
out = [x1 cos - x2 sin | x2 cos + x1 sin], the math in fp32 and the result rounded to q's dtype,
as `tensorjet.layers.rotary.RotaryEmbedding` does. The PyTorch version is about nine kernels per
tensor; here one program per token rotates all its query and key heads. q and k may be strided views
(slices of the fused qkv projection), which are updated in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import next_pow2
from tensorjet.kernels.reference import rotary_ref

__all__ = ["apply_rotary", "rotary_ref"]


@triton.jit
def _rotate_heads(
    base,
    stride_h,
    cos,
    sin,
    offs_d,
    d_mask,
    NUM_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < NUM_HEADS)[:, None] & d_mask[None, :]
    ptr1 = base + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptr1, out1.to(base.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, out2.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, offs_d, d_mask, NUM_Q_HEADS, BLOCK_HQ, HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, offs_d, d_mask, NUM_K_HEADS, BLOCK_HK, HALF)


def apply_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place at `positions` [T]; cos/sin: fp32 [max_pos, D/2].

    Returns (q, k) for call-site symmetry with `RotaryEmbedding.forward`."""
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or head_dim % 2:
        raise ValueError("q and k need a contiguous, even head dim (they are updated in place)")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape != sin.shape:
        raise ValueError("cos and sin must be float32 [max_pos, D/2] caches of the same shape")
    if cos.shape[1] != head_dim // 2:
        raise ValueError(f"cos/sin have {cos.shape[1]} columns, expected {head_dim // 2}")
    cos, sin, positions = cos.contiguous(), sin.contiguous(), positions.contiguous()
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q,
            k,
            positions,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            NUM_Q_HEADS=num_q_heads,
            NUM_K_HEADS=k.shape[1],
            HALF=half,
            BLOCK_HQ=next_pow2(num_q_heads),
            BLOCK_HK=next_pow2(k.shape[1]),
            BLOCK_D=next_pow2(half),
            num_warps=4,
        )
    return q, k
