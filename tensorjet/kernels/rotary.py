"""Rotary position embedding applied in place to q and k in one launch, optionally fused with the
KV-cache write.

Rotate-half layout (HF Llama/Mistral/Qwen): with x = [x1 | x2] split at half the head dim,
out = [x1 cos - x2 sin | x2 cos + x1 sin], the math in fp32 and the result rounded to q's dtype,
as `tensorjet.layers.rotary.RotaryEmbedding` does. The PyTorch version is about nine kernels per
tensor; here one program per token rotates all its query and key heads. q and k may be strided views
(slices of the fused qkv projection), which are updated in place.

`rotary_and_store_kv` also writes the rotated keys and the values into the paged KV cache (what
`store_kv` does after `apply_rotary`), saving a launch per layer: the keys go to the cache straight
from registers, rounded to k's dtype first, so the cache holds the same bytes as the two-kernel path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tensorjet.dtypes import is_fp8
from tensorjet.kernels._common import (
    interpreting,
    launch_next_kernel,
    next_pow2,
    pdl_enabled,
    pdl_launch,
    wait_for_previous_kernel,
)
from tensorjet.kernels.reference import rotary_ref
from tensorjet.kernels.store_kv import store_kv, store_to_cache

__all__ = ["apply_rotary", "rotary_and_store_kv", "rotary_ref"]


@triton.jit
def _heads(base, stride_h, offs_h, offs_d):
    """[BLOCK_H, BLOCK_D] pointers to the first halves of one token's heads at `base`."""
    return base + offs_h[:, None] * stride_h + offs_d[None, :]


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
    """Rotate one token's NUM_HEADS heads at `base` in place; returns the rotated halves, rounded to
    base's dtype as stored, and their [BLOCK_H, BLOCK_D] mask."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < NUM_HEADS)[:, None] & d_mask[None, :]
    ptr1 = _heads(base, stride_h, offs_h, offs_d)
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(base.dtype.element_ty)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(base.dtype.element_ty)
    tl.store(ptr1, out1, mask=mask)
    tl.store(ptr1 + HALF, out2, mask=mask)
    return out1, out2, mask


@triton.jit
def _cos_sin(positions_ptr, cos_ptr, sin_ptr, token, stride_cos, offs_d, d_mask):
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    return cos, sin


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
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    cos, sin = _cos_sin(positions_ptr, cos_ptr, sin_ptr, token, stride_cos, offs_d, d_mask)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, offs_d, d_mask, NUM_Q_HEADS, BLOCK_HQ, HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, offs_d, d_mask, NUM_K_HEADS, BLOCK_HK, HALF)


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_kcb,
    stride_kco,
    stride_kch,
    stride_vcb,
    stride_vco,
    stride_vch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SATURATE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    launch_next_kernel(PDL)  # one short program per token: the attention after it may as well get ready
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    cos, sin = _cos_sin(positions_ptr, cos_ptr, sin_ptr, token, stride_cos, offs_d, d_mask)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, offs_d, d_mask, NUM_Q_HEADS, BLOCK_HQ, HALF)
    k1, k2, mask = _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, cos, sin, offs_d, d_mask, NUM_K_HEADS, BLOCK_HK, HALF
    )
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # -1: a padded row, which never touches the cache
        offs_h = tl.arange(0, BLOCK_HK)
        blk = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        # The rotated keys from registers (not re-read from k), then v as it is.
        kc = _heads(k_cache_ptr + blk * stride_kcb + off * stride_kco, stride_kch, offs_h, offs_d)
        store_to_cache(kc, k1, mask, SATURATE)
        store_to_cache(kc + HALF, k2, mask, SATURATE)
        vp = _heads(v_ptr + token * stride_vt, stride_vh, offs_h, offs_d)
        vc = _heads(v_cache_ptr + blk * stride_vcb + off * stride_vco, stride_vch, offs_h, offs_d)
        store_to_cache(vc, tl.load(vp, mask=mask), mask, SATURATE)
        store_to_cache(vc + HALF, tl.load(vp + HALF, mask=mask), mask, SATURATE)


def _check_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
):
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D]")
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or head_dim % 2:
        raise ValueError("q and k need a contiguous, even head dim (they are updated in place)")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape != sin.shape:
        raise ValueError("cos and sin must be float32 [max_pos, D/2] caches of the same shape")
    if cos.shape[1] != head_dim // 2:
        raise ValueError(f"cos/sin have {cos.shape[1]} columns, expected {head_dim // 2}")


def apply_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place at `positions` [T]; cos/sin: fp32 [max_pos, D/2].

    Returns (q, k) for call-site symmetry with `RotaryEmbedding.forward`."""
    _check_rotary(positions, q, k, cos, sin)
    num_tokens, num_q_heads, head_dim = q.shape
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


def rotary_and_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`apply_rotary(positions, q, k, cos, sin)` then `store_kv(k, v, k_cache, v_cache, slot_mapping)`
    in one launch: q [T, Hq, D] and k [T, Hk, D] are rotated in place, and the rotated k and v [T, Hk, D]
    go to `k_cache, v_cache: [num_blocks, block_size, Hk, D]` at `slot_mapping: [T]` (int32/int64;
    -1 = skip). q, k, v may be strided views with a contiguous last dim and share one dtype; the caches
    hold that dtype or FP8 (saturated at +-448). No host synchronisation; CUDA-graph safe.
    """
    _check_rotary(positions, q, k, cos, sin)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or v.stride(-1) != 1:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}, with a contiguous last dim")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}: expected [num_blocks, block_size, "
            f"{num_kv_heads}, {head_dim}]"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches need a contiguous head dim")
    if k_cache.dtype != v_cache.dtype or not (k_cache.dtype == q.dtype or is_fp8(k_cache.dtype)):
        raise ValueError(f"cache dtypes {k_cache.dtype}, {v_cache.dtype}: expected {q.dtype} or FP8")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping {tuple(slot_mapping.shape)} {slot_mapping.dtype}: expected int32/64 [T]"
        )
    if num_tokens == 0:
        return
    saturate = is_fp8(k_cache.dtype)
    if saturate and interpreting():
        # The interpreter's float -> FP8 cast does not round like the GPU's, and the rotated keys only
        # exist inside the kernel: take the two-kernel path, whose store_kv converts with torch.
        apply_rotary(positions, q, k, cos, sin)
        store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    half = head_dim // 2
    pdl = pdl_enabled(q.device)
    _rotary_store_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=q.shape[1],
        NUM_K_HEADS=num_kv_heads,
        HALF=half,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_HQ=next_pow2(q.shape[1]),
        BLOCK_HK=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(half),
        SATURATE=saturate,
        PDL=pdl,
        num_warps=4,
        **pdl_launch(pdl),
    )
