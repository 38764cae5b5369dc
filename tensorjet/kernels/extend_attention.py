"""Prefill / extend attention over a ragged batch, reading keys and values from the paged cache.

Sequence i owns `query_lens[i]` query rows starting at row `query_start_loc[i]`; they are the last
query_lens[i] of its `context_lens[i]` tokens (cached prefix + new, all already in the cache). Query j
sits at position context_len - query_len + j and sees keys at positions <= its own.

One program per (query tile of BLOCK_M rows, query head, sequence) runs one online softmax. Keys are
visited in two phases: the part strictly before the tile's first query (visible to every row, only
a length mask) and the diagonal part (causal mask). Tiles past a sequence's query length exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tensorjet.dtypes import is_fp8
from tensorjet.kernels._common import (
    LOG2E,
    as_f16,
    as_int32,
    dot_precision,
    dot_upcast,
    host_max,
    last_dim_contiguous,
    next_pow2,
    tl_dot,
    with_overrides,
)
from tensorjet.kernels.reference import extend_attention_ref

__all__ = ["extend_attention", "extend_attention_ref"]


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    offs_n,
    valid,
    n_mask,
    table,
    k_base,
    v_base,
    offs_d,
    d_mask,
    qk_scale,
    stride_kb,
    stride_ko,
    stride_vb,
    stride_vo,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One BLOCK_N tile of keys at positions `offs_n` into the online softmax. MASKED: loaded where
    n_mask, and `valid` [BLOCK_M, BLOCK_N] says which scores count; else every key of the tile counts
    for every row (no selects, no load masks but the head dimension's)."""
    if MASKED:
        page = tl.load(table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        page = tl.load(table + offs_n // PAGE_SIZE).to(tl.int64)
        kv_mask = d_mask[None, :]
    in_page = (offs_n % PAGE_SIZE).to(tl.int64)
    k = tl.load(
        k_base + (page * stride_kb + in_page * stride_ko)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
    ).to(q.dtype)  # an FP8 cache is read as the query's dtype
    qk = tl_dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
    if MASKED:
        qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_base + (page * stride_vb + in_page * stride_vo)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
    ).to(q.dtype)
    acc = acc * alpha[:, None] + tl_dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
    return acc, m_new, l_i


# The block-table width changes every step: specialising on it (== 1, % 16) would recompile.
@triton.jit(do_not_specialize=["stride_bt"])
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    q_start_ptr,
    q_lens_ptr,
    context_lens_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    F16_COMPUTE: tl.constexpr,
    FIXED_KEY_TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + seq)
    if pid_m * BLOCK_M >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq).to(tl.int64)
    ctx_len = tl.load(context_lens_ptr + seq)
    prefix = ctx_len - q_len
    kv_head = head // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_rows = q_start + offs_m.to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if F16_COMPUTE:
        q = as_f16(q)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh

    end2 = tl.minimum(ctx_len, prefix + (pid_m + 1) * BLOCK_M)
    if FIXED_KEY_TILES:
        # Batch-invariant order: no prefix phase, so every key tile starts at a multiple of BLOCK_N and is
        # masked by causality. A row's sums then depend only on its own position and keys, not on how
        # its sequence was chunked or which rows share its tile (a tile past a row adds exact zeros).
        end1 = 0
    else:
        end1 = prefix + pid_m * BLOCK_M
    # Phase 1: keys before the tile's first query position, visible to every row: whole tiles with no
    # masks, then the partial tile a prefix not a multiple of BLOCK_N leaves.
    full1 = end1 // BLOCK_N * BLOCK_N
    for n0 in range(0, full1, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n0 + offs_n0, None, None, table, k_base, v_base, offs_d, d_mask,
            qk_scale, stride_kb, stride_ko, stride_vb, stride_vo, PAGE_SIZE, False, DOT_PREC, UPCAST,
        )  # fmt: skip
    if full1 < end1:
        offs_n = full1 + offs_n0
        n_mask = offs_n < end1
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, offs_n, n_mask[None, :], n_mask, table, k_base, v_base, offs_d, d_mask,
            qk_scale, stride_kb, stride_ko, stride_vb, stride_vo, PAGE_SIZE, True, DOT_PREC, UPCAST,
        )  # fmt: skip
    # Phase 2: the diagonal, causal.
    for n0 in range(end1, end2, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < end2
        valid = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, offs_n, valid, n_mask, table, k_base, v_base, offs_d, d_mask,
            qk_scale, stride_kb, stride_ko, stride_vb, stride_vo, PAGE_SIZE, True, DOT_PREC, UPCAST,
        )  # fmt: skip

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _block_sizes(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if device.type != "cuda":
        return 32, 32, 4, 1  # interpreter: small tiles keep numpy work down
    if dtype == torch.float32:
        return (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        # H200, D=128 (benchmarks/attention_sweep.py, 2026-11-29): with the maskless loop over whole prefix
        # tiles, 64-row 4-warp programs at 3 stages beat the old 128-row 8-warp launches on 8 x 1,024 fresh
        # prompts, 8 chunks of 512 on 1,536 cached tokens and ragged 100-1,024-token prompts: bf16 (at 5
        # stages) by 7-22%, an FP8 cache (at 3) by 12-23%. 128 x 128 at 8 warps and 5 stages is 12% faster
        # again on the FP8 cached-prefix case alone.
        return 64, 64, 4, 3
    return 64, 32, 4, 2


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fixed_key_tiles: bool = False,
) -> torch.Tensor:
    """Causal attention of a ragged batch of query chunks over their cached contexts.

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; block_tables: int32
    [num_seqs, max_blocks] (-1 padded); query_start_loc: int32 [num_seqs(+1)] (only the first num_seqs
    entries are read: sequence i's first query row, so a subset of a batch can be passed);
    query_lens, context_lens: int32 [num_seqs] (lists are accepted too). Returns `out` (allocated like
    q when None); rows of q owned by no sequence are not written.

    max_query_len sizes the grid; read from query_lens (a device sync for a GPU tensor) when None.
    block_m, block_n, num_warps, num_stages override the tuned launch configuration (for sweeps).
    fixed_key_tiles: visit keys in tiles at fixed absolute positions, so each row's result is the same
    whatever its query chunk and its batch (a one-row decode included): the batch-invariant mode.
    """
    num_seqs = block_tables.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    assert q.shape[2] == head_dim and num_q_heads % num_kv_heads == 0
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and out.stride(-1) == 1
    q = last_dim_contiguous(q)
    device = q.device
    if max_query_len is None:
        max_query_len = host_max(query_lens)
    query_start_loc = as_int32(query_start_loc, device)
    query_lens = as_int32(query_lens, device)
    context_lens = as_int32(context_lens, device)
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if max_query_len <= 0:
        return out
    tuned = _block_sizes(head_dim, q.dtype, device)
    block_m, block_n, num_warps, num_stages = with_overrides(tuned, (block_m, block_n, num_warps, num_stages))
    grid = (triton.cdiv(max_query_len, block_m), num_q_heads, num_seqs)
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        query_lens,
        context_lens,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PAGE_SIZE=page_size,
        DOT_PREC=dot_precision(q.dtype),
        UPCAST=dot_upcast(q.dtype),
        F16_COMPUTE=is_fp8(k_cache.dtype) and q.dtype == torch.bfloat16,
        FIXED_KEY_TILES=fixed_key_tiles,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
