"""Split-KV flash-decoding over the paged KV cache, with GQA head packing.

One query per sequence. Stage 1 runs one program per (sequence, kv head, kv split): it loads that KV
head's keys/values for its slice of the context once and computes all `group` query heads that share
the head at once (a [group, head_dim] x [head_dim, BLOCK_N] dot), keeping an online softmax; it writes
a partial output (already normalised) and its log-sum-exp (base 2). Stage 2 merges the splits. With a
single split, stage 1 writes the final output directly and stage 2 is skipped.

Split boundaries are computed in the kernel from each sequence's own context length, so sequences of
different lengths share one launch; `num_splits` only sets the grid (and never needs a host sync when
the caller passes it or `max_context_len`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import (
    LOG2E,
    as_f16,
    as_int32,
    dot_precision,
    dot_upcast,
    host_max,
    last_dim_contiguous,
    launch_next_kernel,
    next_pow2,
    num_sms,
    pdl_enabled,
    pdl_launch,
    tl_dot,
    wait_for_previous_kernel,
)
from tensorjet.kernels.reference import decode_attention_ref
from tensorjet.layers.attention import is_fp8

__all__ = ["decode_attention", "decode_attention_ref", "choose_num_splits"]

BLOCK_N = 64  # keys per inner iteration
FP8_BLOCK_N = 128  # an FP8 tile of 64 keys is half the bytes: too little per iteration to hide latency
NUM_WARPS = 4
# Triton's pipeliner spends a stage on the block-table load that K/V addresses depend on: below 5 stages
# it keeps one K/V buffer and issues the next tile's copy after this tile's compute (nothing overlaps);
# from 5 it double-buffers (see benchmarks/attention_sweep.py). On the H200, a batch-256 x 1,500-context
# layer: FP8 0.36 ms at 5 stages against 0.41-0.45 at 3; bf16 within noise, so it keeps 3 (two where
# three tiles would not fit the budget: fp32 caches with large heads).
NUM_STAGES = 3
FP8_NUM_STAGES = 5
STAGE_BYTES_BUDGET = 160 * 1024
MIN_TOKENS_PER_SPLIT = 256  # a split shorter than this costs more in partial writes than it gains
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # aim for about this many stage-1 programs per SM


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device | None = None
) -> int:
    """How many KV splits per (sequence, kv head) to fill the GPU.

    About PROGRAMS_PER_SM * #SMs stage-1 programs in all (num_seqs * num_kv_heads * splits, rounded
    to the nearest split count), but every split keeps at least MIN_TOKENS_PER_SPLIT keys of the
    longest context, and at most MAX_SPLITS. Large batches or short contexts get 1 split (no reduction
    pass at all). Measured on an H200 (bf16, Hk=8, group 4, D=128): batch 1 x 32k keys reads 2.2 TB/s
    with 32 splits against 0.14 with 1; batch 8 x 8k peaks at 8 splits; from ~4 programs per SM
    (batch 64 x 8 heads) on, 1 split is best, at 3.8-4.0 TB/s.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = max(1, num_seqs * num_kv_heads)
    want = (PROGRAMS_PER_SM * num_sms(device) + base // 2) // base
    useful = triton.cdiv(max(int(max_context_len), 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, useful, MAX_SPLITS))


# The block-table width changes every step: specialising on it (== 1, % 16) would recompile.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_stage1_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    rows_ptr,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
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
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    F16_COMPUTE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    ctx_len = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_len)

    if HAS_ROWS:
        row = tl.load(rows_ptr + seq).to(tl.int64)
    else:
        row = seq.to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if F16_COMPUTE:
        q = as_f16(q)

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < end
        page = tl.load(table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_page = (offs_n % PAGE_SIZE).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_base + (page * stride_kb + in_page * stride_ko)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        k = k.to(q.dtype)  # an FP8 cache is read as the query's dtype (fp16 then, see as_f16)
        qk = tl_dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + (page * stride_vb + in_page * stride_vo)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl_dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new

    launch_next_kernel(PDL)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(
            out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))  # empty split: -inf
        seq64 = seq.to(tl.int64)
        tl.store(
            mid_o_ptr
            + seq64 * stride_mo_b
            + heads[:, None] * stride_mo_h
            + split * stride_mo_s
            + offs_d[None, :],
            o,
            mask=g_mask[:, None] & d_mask[None, :],
        )
        tl.store(mid_lse_ptr + seq64 * stride_ml_b + heads * stride_ml_h + split, lse, mask=g_mask)


@triton.jit
def _decode_stage2_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    rows_ptr,
    out_ptr,
    num_splits,
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    launch_next_kernel(PDL)  # a short merge: the projection after it may start fetching its weights
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + seq).to(tl.int64)
    else:
        row = seq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        mid_lse_ptr + seq * stride_ml_b + head * stride_ml_h + offs_s, mask=s_mask, other=float("-inf")
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (context_len 0): output zeros
    w = tl.exp2(lse - m)
    o = tl.load(
        mid_o_ptr + seq * stride_mo_b + head * stride_mo_h + offs_s[:, None] * stride_mo_s + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    denom = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=d_mask
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    rows: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    q: [num_seqs, Hq, D] (extra trailing rows, e.g. CUDA-graph padding, are ignored; with `rows`,
    any [T, Hq, D] where sequence i's query is q[rows[i]]);
    k_cache, v_cache: [num_blocks, block_size, Hk, D]; block_tables: int32 [num_seqs, max_blocks]
    (-1 padded); context_lens: int32 [num_seqs] (0 gives a zero output). Returns `out` (allocated
    like q when None); only the rows of the batch are written.

    num_splits: KV splits per sequence; None picks `choose_num_splits(...)` from `max_context_len`
    (read from context_lens with a device sync when not given).
    """
    num_seqs = block_tables.shape[0] if rows is None else rows.shape[0]
    if rows is None:
        assert q.shape[0] >= num_seqs, "q must hold one query per sequence (or pass rows=)"
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    assert q.shape[2] == head_dim and num_q_heads % num_kv_heads == 0
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and out.stride(-1) == 1
    group = num_q_heads // num_kv_heads
    q = last_dim_contiguous(q)
    device = q.device
    context_lens = as_int32(context_lens, device)
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if num_splits is None:
        if max_context_len is None:
            max_context_len = host_max(context_lens)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, device)
    num_splits = max(1, int(num_splits))

    direct = num_splits == 1
    if direct:
        mid_o = mid_lse = out  # unused placeholders
        mo_strides, ml_strides = (0, 0, 0), (0, 0)
    else:
        mid_o = torch.empty((num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        mid_lse = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=device)
        mo_strides, ml_strides = mid_o.stride()[:3], mid_lse.stride()[:2]
    kv_fp8 = is_fp8(k_cache.dtype)
    if block_n is None:
        block_n = FP8_BLOCK_N if kv_fp8 else BLOCK_N
    has_rows = rows is not None
    rows_arg = rows if has_rows else context_lens
    block_d = next_pow2(head_dim)
    block_g = max(16, next_pow2(group))
    if num_warps is None:
        num_warps = NUM_WARPS
    if num_stages is None:
        kv_tile_bytes = 2 * block_n * block_d * k_cache.element_size()
        if kv_fp8:
            num_stages = FP8_NUM_STAGES
        else:
            num_stages = NUM_STAGES if NUM_STAGES * kv_tile_bytes <= STAGE_BYTES_BUDGET else 2

    f16_compute = kv_fp8 and q.dtype == torch.bfloat16
    pdl = pdl_enabled(device)
    _decode_stage1_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        rows_arg,
        out,
        mid_o,
        mid_lse,
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
        *mo_strides,
        *ml_strides,
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        PAGE_SIZE=page_size,
        HAS_ROWS=has_rows,
        DIRECT=direct,
        DOT_PREC=dot_precision(q.dtype),
        UPCAST=dot_upcast(q.dtype),
        F16_COMPUTE=f16_compute,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(pdl),
    )
    if not direct:
        _decode_stage2_kernel[(num_seqs, num_q_heads)](
            mid_o,
            mid_lse,
            rows_arg,
            out,
            num_splits,
            *mo_strides,
            *ml_strides,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=next_pow2(num_splits),
            HAS_ROWS=has_rows,
            PDL=pdl,
            num_warps=4 if block_d >= 128 else 2,
            **pdl_launch(pdl),
        )
    return out
