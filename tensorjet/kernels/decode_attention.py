"""Split-KV flash-decoding over the paged KV cache, with GQA head packing.

One query per sequence, or a few (`query_lens`: drafts to verify, the last rows of a sequence, each
seeing the keys up to its own position). Stage 1 runs one program per (sequence, kv head, kv split): it
loads that KV head's keys/values for its slice of the context once and computes all `group` query heads
that share the head, for each of the sequence's query rows, at once (a [rows x group, head_dim] x
[head_dim, BLOCK_N] dot), keeping an online softmax; it writes a partial output (already normalised) and
its log-sum-exp (base 2). Stage 2 merges the splits. With a single split, stage 1 writes the final
output directly and stage 2 is skipped. A tensor-core dot takes at least 16 rows, so a few query rows
per sequence cost no more than one: a verify step reads its keys once, in as many splits as a decode.

An FP8 cache has its own stage 1 (`_decode_fp8_stage1_kernel`): it reads the cache as int16 words and
turns each into two fp16 values at once (`e4m3_pairs`), the low bytes being the even head dimensions
and the high bytes the odd ones. Read as bytes, Triton loads the transposed E4M3 key tile from shared
memory one byte at a time; the word loop has 7.2 instructions per key per warp against 10.9 and ran
a batch-256 x 1,500-context layer in 0.21 ms against 0.30-0.47 for the byte loop on the H200
(benchmarks/fp8_decode_sweep.py, 2026-11-29; tests/test_kernel_codegen.py keeps the bytes out).

Split boundaries are computed in the kernel from each sequence's own context length, so sequences of
different lengths share one launch; `num_splits` only sets the grid (and never needs a host sync when
the caller passes it or `max_context_len`).
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
    e4m3_pairs,
    host_max,
    last_dim_contiguous,
    launch_next_kernel,
    next_pow2,
    num_sms,
    pdl_enabled,
    pdl_launch,
    supports_e4m3_cvt,
    tl_dot,
    wait_for_previous_kernel,
    with_overrides,
)
from tensorjet.kernels.reference import decode_attention_ref

__all__ = ["decode_attention", "decode_attention_ref", "choose_num_splits"]

BLOCK_N = 64  # keys per inner iteration
NUM_WARPS = 4
# Triton's pipeliner spends a stage on the block-table load that K/V addresses depend on: below 5 stages
# it keeps one K/V buffer and issues the next tile's copy after this tile's compute (nothing overlaps);
# from 5 it double-buffers (see benchmarks/attention_sweep.py). On the H200, bf16 was within noise of 3
# stages, so it keeps 3 (two where three tiles would not fit the budget: fp32 caches with large heads).
NUM_STAGES = 3
# The FP8 word loop, batch 256 x 1,500 context on the H200 (benchmarks/fp8_decode_sweep.py, calls queued
# back to back): 0.211 ms with 128 keys, 4 warps, 5 stages (3.7 TB/s); 0.226 with 64 keys; 0.263 with
# 2 warps, which spill registers at 128 keys.
FP8_BLOCK_N, FP8_NUM_WARPS, FP8_NUM_STAGES = 128, 4, 5
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


@triton.jit
def _split_range(ctx_len, split, num_splits, BLOCK_N: tl.constexpr):
    """Keys [start, end) of this split of a context: splits of whole tiles, the last one shorter."""
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    return start, tl.minimum(start + split_len, ctx_len)


@triton.jit
def _program_keys(context_lens_ptr, rows_ptr, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """A stage-1 program's (sequence, KV head, split), its query's token row (`rows_ptr[seq]`, or seq
    itself when every row decodes), and the keys [start, end) of its split."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start, end = _split_range(tl.load(context_lens_ptr + seq), split, tl.num_programs(2), BLOCK_N)
    if HAS_ROWS:
        row = tl.load(rows_ptr + seq).to(tl.int64)
    else:
        row = seq.to(tl.int64)
    return seq, kv_head, split, row, start, end


@triton.jit
def _tile_slots(table, offs_n, n_mask, PAGE_SIZE: tl.constexpr):
    """The tile's keys as (page, slot in the page), int64 for offset arithmetic over a large cache."""
    page = tl.load(table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    return page, (offs_n % PAGE_SIZE).to(tl.int64)


@triton.jit
def _query_rows(q_len_ptr, seq, kv_head, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, MULTI_ROW: tl.constexpr):
    """The tile's rows: row i is query row i // GROUP of the sequence at head kv_head * GROUP + i % GROUP;
    (query row of each, head of each, rows in use, the sequence's query length)."""
    offs_m = tl.arange(0, BLOCK_M)
    j = offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    q_len = tl.load(q_len_ptr + seq) if MULTI_ROW else 1
    return j, heads, j < q_len, q_len


@triton.jit
def _visible(offs_n, end, ctx_len, q_len, j, MULTI_ROW: tl.constexpr):
    """Which keys of the tile count for each row: those of the split, and with several query rows only
    those up to the row's own position (row j of q_len sits at ctx_len - q_len + j)."""
    visible = (offs_n < end)[None, :]
    if MULTI_ROW:
        visible = visible & (offs_n[None, :] <= (ctx_len - q_len + j)[:, None])
    return visible


@triton.jit
def _online_softmax(qk, visible, m_i, l_i):
    """One tile of base-2 scores into the running max and sum: (p, rescale factor, new max, new sum)."""
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _write_split(
    acc,
    m_i,
    l_i,
    seq,
    row,
    split,
    j,
    heads,
    m_mask,
    offs_d,
    d_mask,
    out_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    stride_ot,
    stride_oh,
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    QROWS: tl.constexpr,
    DIRECT: tl.constexpr,
):
    """The normalised output: straight to `out` with one split, else a partial and its log-sum-exp
    (partials of query row j of a sequence at entry seq * QROWS + j)."""
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    mask = m_mask[:, None] & d_mask[None, :]
    if DIRECT:
        out = out_ptr + (row + j)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))  # empty split: -inf
        entry = seq.to(tl.int64) * QROWS + j
        mid = mid_o_ptr + entry[:, None] * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s
        tl.store(mid + offs_d[None, :], o, mask=mask)
        tl.store(mid_lse_ptr + entry * stride_ml_b + heads * stride_ml_h + split, lse, mask=m_mask)


# The block-table width changes every step: specialising on it (== 1, % 16) would recompile.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_stage1_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    rows_ptr,
    query_lens_ptr,
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
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    QROWS: tl.constexpr,
    MULTI_ROW: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    seq, kv_head, split, row, start, end = _program_keys(context_lens_ptr, rows_ptr, HAS_ROWS, BLOCK_N)

    j, heads, m_mask, q_len = _query_rows(query_lens_ptr, seq, kv_head, GROUP, BLOCK_M, MULTI_ROW)
    ctx_len = tl.load(context_lens_ptr + seq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (row + j)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        page, slot = _tile_slots(table, offs_n, n_mask, PAGE_SIZE)
        k_rows = page * stride_kb + slot * stride_ko
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl_dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        visible = _visible(offs_n, end, ctx_len, q_len, j, MULTI_ROW)
        p, alpha, m_i, l_i = _online_softmax(qk, visible, m_i, l_i)
        v_rows = page * stride_vb + slot * stride_vo
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl_dot(p.to(v.dtype), v, DOT_PREC, UPCAST)

    launch_next_kernel(PDL)
    _write_split(
        acc, m_i, l_i, seq, row, split, j, heads, m_mask, offs_d, d_mask, out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_ot, stride_oh, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, QROWS, DIRECT,
    )  # fmt: skip


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_fp8_stage1_kernel(
    q_ptr,
    k_words_ptr,
    v_words_ptr,
    block_tables_ptr,
    context_lens_ptr,
    rows_ptr,
    query_lens_ptr,
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
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    QROWS: tl.constexpr,
    MULTI_ROW: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    F16_COMPUTE: tl.constexpr,
    CVT_ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    """Stage 1 over an FP8 cache seen as int16 words (pointers and K/V strides in words). Word w of a
    key holds head dimensions 2w (low byte) and 2w + 1 (high byte), so the scores are
    q_even @ lo^T + q_odd @ hi^T and the output is kept as even and odd halves until the end."""
    wait_for_previous_kernel(PDL)
    seq, kv_head, split, row, start, end = _program_keys(context_lens_ptr, rows_ptr, HAS_ROWS, BLOCK_N)

    j, heads, m_mask, q_len = _query_rows(query_lens_ptr, seq, kv_head, GROUP, BLOCK_M, MULTI_ROW)
    ctx_len = tl.load(context_lens_ptr + seq)
    offs_w = tl.arange(0, BLOCK_D // 2)
    offs_n0 = tl.arange(0, BLOCK_N)
    w_mask = offs_w < HEAD_DIM // 2
    q_even_ptr = q_ptr + (row + j)[:, None] * stride_qt + heads[:, None] * stride_qh + 2 * offs_w[None, :]
    q_mask = m_mask[:, None] & w_mask[None, :]
    q_even = tl.load(q_even_ptr, mask=q_mask, other=0.0)
    q_odd = tl.load(q_even_ptr + 1, mask=q_mask, other=0.0)
    if F16_COMPUTE:
        q_even, q_odd = as_f16(q_even), as_f16(q_odd)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_even = tl.zeros([BLOCK_M, BLOCK_D // 2], dtype=tl.float32)
    acc_odd = tl.zeros([BLOCK_M, BLOCK_D // 2], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_words_ptr + kv_head * stride_kh
    v_base = v_words_ptr + kv_head * stride_vh

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < end
        kv_mask = n_mask[:, None] & w_mask[None, :]
        page, slot = _tile_slots(table, offs_n, n_mask, PAGE_SIZE)
        k_rows = page * stride_kb + slot * stride_ko
        k_words = tl.load(k_base + k_rows[:, None] + offs_w[None, :], mask=kv_mask, other=0)
        k_lo, k_hi = e4m3_pairs(k_words, CVT_ASM)
        qk = tl_dot(q_even, tl.trans(k_lo.to(q_even.dtype)), DOT_PREC, UPCAST)
        qk += tl_dot(q_odd, tl.trans(k_hi.to(q_odd.dtype)), DOT_PREC, UPCAST)
        visible = _visible(offs_n, end, ctx_len, q_len, j, MULTI_ROW)
        p, alpha, m_i, l_i = _online_softmax(qk * qk_scale, visible, m_i, l_i)
        v_rows = page * stride_vb + slot * stride_vo
        v_words = tl.load(v_base + v_rows[:, None] + offs_w[None, :], mask=kv_mask, other=0)
        v_lo, v_hi = e4m3_pairs(v_words, CVT_ASM)
        p = p.to(q_even.dtype)
        acc_even = acc_even * alpha[:, None] + tl_dot(p, v_lo.to(p.dtype), DOT_PREC, UPCAST)
        acc_odd = acc_odd * alpha[:, None] + tl_dot(p, v_hi.to(p.dtype), DOT_PREC, UPCAST)

    launch_next_kernel(PDL)
    acc = tl.join(acc_even, acc_odd).reshape(BLOCK_M, BLOCK_D)  # interleave: columns 2w, 2w + 1
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    _write_split(
        acc, m_i, l_i, seq, row, split, j, heads, m_mask, offs_d, d_mask, out_ptr, mid_o_ptr, mid_lse_ptr,
        stride_ot, stride_oh, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, QROWS, DIRECT,
    )  # fmt: skip


@triton.jit
def _decode_stage2_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    rows_ptr,
    query_lens_ptr,
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
    QROWS: tl.constexpr,
    MULTI_ROW: tl.constexpr,
    PDL: tl.constexpr,
):
    """Merges the splits of query row j of a sequence (program entry = seq * QROWS + j)."""
    wait_for_previous_kernel(PDL)
    launch_next_kernel(PDL)  # a short merge: the projection after it may start fetching its weights
    entry = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq, j = entry // QROWS, entry % QROWS
    if MULTI_ROW:
        if j >= tl.load(query_lens_ptr + seq):
            return
    if HAS_ROWS:
        row = tl.load(rows_ptr + seq).to(tl.int64) + j
    else:
        row = seq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        mid_lse_ptr + entry * stride_ml_b + head * stride_ml_h + offs_s, mask=s_mask, other=float("-inf")
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (context_len 0): output zeros
    w = tl.exp2(lse - m)
    o = tl.load(
        mid_o_ptr
        + entry * stride_mo_b
        + head * stride_mo_h
        + offs_s[:, None] * stride_mo_s
        + offs_d[None, :],
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
    query_lens: torch.Tensor | None = None,
    max_query_len: int = 1,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context, or of a few (`query_lens`).

    q: [num_seqs, Hq, D] (extra trailing rows, e.g. CUDA-graph padding, are ignored; with `rows`,
    any [T, Hq, D] where sequence i's query is q[rows[i]]);
    k_cache, v_cache: [num_blocks, block_size, Hk, D]; block_tables: int32 [num_seqs, max_blocks]
    (-1 padded); context_lens: int32 [num_seqs] (0 gives a zero output). Returns `out` (allocated
    like q when None); only the rows of the batch are written.

    query_lens (with rows): int32 [num_seqs], sequence i's queries are rows rows[i] .. rows[i] +
    query_lens[i] - 1, the last of its context_lens[i] positions, each attending causally (up to its own
    position); at most `max_query_len` each (0 writes nothing).

    num_splits: KV splits per sequence; None picks `choose_num_splits(...)` from `max_context_len`
    (read from context_lens with a device sync when not given).
    """
    num_seqs = block_tables.shape[0] if rows is None else rows.shape[0]
    if rows is None:
        assert q.shape[0] >= num_seqs, "q must hold one query per sequence (or pass rows=)"
    multi_row = query_lens is not None
    assert rows is not None or not multi_row, "several query rows per sequence need their first rows"
    # Rounded up to a power of two: steps of 2-8 rows share a few compiled variants.
    qrows = next_pow2(max_query_len) if multi_row else 1
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
        entries = num_seqs * qrows  # query row j of sequence i: entry i * qrows + j
        mid_o = torch.empty((entries, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        mid_lse = torch.empty((entries, num_q_heads, num_splits), dtype=torch.float32, device=device)
        mo_strides, ml_strides = mid_o.stride()[:3], mid_lse.stride()[:2]
    kv_fp8 = is_fp8(k_cache.dtype)
    has_rows = rows is not None
    rows_arg = rows if has_rows else context_lens
    query_lens_arg = as_int32(query_lens, device) if multi_row else context_lens
    block_d = next_pow2(head_dim)
    pdl = pdl_enabled(device)
    if kv_fp8:
        assert head_dim % 2 == 0, "an FP8 cache is read in pairs of head dimensions"
        kernel = _decode_fp8_stage1_kernel
        k_arg, v_arg = k_cache.view(torch.int16), v_cache.view(torch.int16)  # strides in words
        tile = (FP8_BLOCK_N, FP8_NUM_WARPS, FP8_NUM_STAGES)
        fp8_options = dict(F16_COMPUTE=q.dtype == torch.bfloat16, CVT_ASM=supports_e4m3_cvt(device))
    else:
        assert k_cache.dtype == q.dtype, "a non-FP8 cache holds the model's dtype"
        kernel, k_arg, v_arg, fp8_options = _decode_stage1_kernel, k_cache, v_cache, {}
        tile_bytes = 2 * BLOCK_N * block_d * k_cache.element_size()
        tile = (BLOCK_N, NUM_WARPS, NUM_STAGES if NUM_STAGES * tile_bytes <= STAGE_BYTES_BUDGET else 2)
    block_n, num_warps, num_stages = with_overrides(tile, (block_n, num_warps, num_stages))
    kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_arg,
        v_arg,
        block_tables,
        context_lens,
        rows_arg,
        query_lens_arg,
        out,
        mid_o,
        mid_lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *k_arg.stride()[:3],
        *v_arg.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *mo_strides,
        *ml_strides,
        GROUP=group,
        BLOCK_M=max(16, next_pow2(qrows * group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        PAGE_SIZE=page_size,
        HAS_ROWS=has_rows,
        QROWS=qrows,
        MULTI_ROW=multi_row,
        DIRECT=direct,
        DOT_PREC=dot_precision(q.dtype),
        UPCAST=dot_upcast(q.dtype),
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        **fp8_options,
        **pdl_launch(pdl),
    )
    if not direct:
        _decode_stage2_kernel[(num_seqs * qrows, num_q_heads)](
            mid_o,
            mid_lse,
            rows_arg,
            query_lens_arg,
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
            QROWS=qrows,
            MULTI_ROW=multi_row,
            PDL=pdl,
            num_warps=4 if block_d >= 128 else 2,
            **pdl_launch(pdl),
        )
    return out
