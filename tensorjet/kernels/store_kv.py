"""Write a step's new keys/values into the paged KV cache.

`k, v: [num_tokens, num_kv_heads, head_dim]` go to `k_cache, v_cache: [num_blocks, block_size,
num_kv_heads, head_dim]` at `slot_mapping[t] = block * block_size + offset`. A slot of -1 marks a
padded row (CUDA-graph padding) and is skipped, so padding never touches the cache. An FP8 cache
stores values saturated at +-448 and rounded to nearest even (`to_cache_dtype`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tensorjet.dtypes import FP8_MAX, is_fp8, to_cache_dtype
from tensorjet.kernels._common import interpreting, last_dim_contiguous, next_pow2
from tensorjet.kernels.reference import store_kv_ref

_FP8_MAX = tl.constexpr(FP8_MAX)

__all__ = ["store_kv", "store_kv_ref"]


@triton.jit
def store_to_cache(ptrs, x, mask, SATURATE: tl.constexpr):
    """Store x at `ptrs` in the cache's dtype; SATURATE (an FP8 cache) clamps to +-448 before the cast."""
    if SATURATE:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -_FP8_MAX), _FP8_MAX)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kco,
    stride_kch,
    stride_vcb,
    stride_vco,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SATURATE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kco
    store_to_cache(kc + offs_h[:, None] * stride_kch + offs_d[None, :], k, mask, SATURATE)

    v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vco
    store_to_cache(vc + offs_h[:, None] * stride_vch + offs_d[None, :], v, mask, SATURATE)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write `k, v: [T, Hk, D]` into the caches at `slot_mapping: [T]` (int32/int64; -1 = skip).

    `k`/`v` may be strided views (e.g. slices of a fused QKV projection) as long as the last dim is
    contiguous. Values are cast to the cache dtype (an FP8 cache saturates them first). No host
    synchronisation; CUDA-graph safe.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    assert v_cache.shape == k_cache.shape
    assert k.shape[0] >= num_tokens and v.shape[0] >= num_tokens
    assert k.shape[1:] == (num_kv_heads, head_dim) and v.shape[1:] == (num_kv_heads, head_dim)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    saturate = is_fp8(k_cache.dtype)
    if saturate and interpreting():
        # The interpreter's float -> FP8 cast does not round like the GPU's; convert with torch and
        # let the kernel copy the bytes.
        k, v, saturate = to_cache_dtype(k, k_cache.dtype), to_cache_dtype(v, v_cache.dtype), False
    block_d = next_pow2(head_dim)
    block_h = min(next_pow2(num_kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _store_kv_kernel[grid](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        SATURATE=saturate,
        num_warps=4 if block_h * block_d >= 1024 else 2,
    )
