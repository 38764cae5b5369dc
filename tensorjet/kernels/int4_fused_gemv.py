"""Batch-1 INT4 (W4A16) decode projections with the ops around them fused in: `int4_fused_gemv`.

y[N] = x[K] @ W[N, K]^T with W an `Int4Weight` (`tensorjet.kernels.int4_linear`'s layout and decode
numerics), optionally with:
- `norm_weight`: the product uses RMSNorm(x), rounded to x's dtype as the norm kernel stores it; a pass
  over x for its sum of squares comes first (x is one row: it is read from cache);
- `residual`: the result added into `residual` in place (the o and down projections);
- `silu_mul`: W holds [gate; up]; returns silu(gate) * up (the gate|up projection).
An act-order weight reads x (and the norm weight) at its permutation's columns.

Each program multiplies [BLOCK_N, BLOCK_K] tiles either on the tensor cores as `int4_matmul` does
(eight slices, one nibble of each word; where a tile lies in one group, exact code - zero products
summed in fp32 and the group's scale applied to the sum), with the one row of x broadcast to the MMA's
16 columns, or (`fma`, tiles within one group) on fp32 FMAs: each nibble shifted into the top of the
mantissa of 1.0 is the float 1 + code / 16 (a shift and a LOP3), so each weight costs three
instructions with its FMA and never passes through shared memory on its way to an MMA operand.
SPLIT_K programs per row block each sum a slice of K into fp32 scratch, and the last to finish (an
atomic counter per row block) adds the slices in a fixed order and runs the epilogue, so the whole
projection stays one launch (as `tensorjet.kernels.fp8_fused_gemv` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import (
    dot_precision,
    dot_upcast,
    launch_next_kernel,
    next_pow2,
    pdl_enabled,
    pdl_launch,
    tl_dot,
    wait_for_previous_kernel,
)
from tensorjet.kernels.fused_gemv import fused_output, store_fused_output
from tensorjet.kernels.gemv import fastest_in_graph, time_in_graph_ms
from tensorjet.kernels.int4_linear import cold_weights, load_codes, packed_pairs, slice_pair
from tensorjet.kernels.int4_reference import Int4Weight
from tensorjet.kernels.split_k import reduce_row_slices, split_k_buffers

__all__ = ["CANDIDATES", "Int4FusedGemvConfig", "candidates_for", "int4_fused_gemv", "select_int4_fused_gemv"]

X_BLOCK = 4096  # the pass over x for its sum of squares reads it this many elements at a time


@dataclass(frozen=True)
class Int4FusedGemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs per row block, each over a slice of K
    # fp32 FMAs on codes made floats in place of the tensor cores (tiles within one group only)
    fma: bool = False

    def fits(self, weight: Int4Weight) -> bool:
        """Whether this tile can multiply `weight`: an FMA tile must lie in one group."""
        return not self.fma or weight.group_size % self.block_k == 0


# As `tensorjet.kernels.int4_linear.GEMV_CANDIDATES`: 64 rows on 4 warps or 128 rows on 8 (one
# warpgroup per 64 rows keeps the dequantized tile in registers), split over K for the 4096-row weights.
# (With RMSNorm and SiLU fused these compile to 5.0-5.8 instructions per weight on sm_90.)
CANDIDATES = (
    Int4FusedGemvConfig(64, 128, 4, 4),
    Int4FusedGemvConfig(128, 128, 8, 4),
    Int4FusedGemvConfig(64, 128, 4, 4, split_k=2),
    Int4FusedGemvConfig(128, 128, 8, 4, split_k=2),
    Int4FusedGemvConfig(64, 128, 4, 4, split_k=4),
    Int4FusedGemvConfig(128, 128, 8, 4, split_k=4),
    # 32 rows on 2 warps: mma.sync instead of wgmma (`tensorjet.kernels.int4_linear.GEMV_CANDIDATES`).
    Int4FusedGemvConfig(32, 128, 2, 4),
    Int4FusedGemvConfig(32, 128, 2, 4, split_k=2),
    Int4FusedGemvConfig(32, 128, 2, 4, split_k=4),
    # fp32 FMAs (sm_90, RMSNorm and SiLU fused: 4.8-5.6 instructions per weight, no spills; 128 rows on
    # 4 warps spill).
    Int4FusedGemvConfig(64, 128, 4, 1, fma=True),
    Int4FusedGemvConfig(128, 128, 8, 1, fma=True),
    Int4FusedGemvConfig(256, 128, 4, 1, fma=True),
    Int4FusedGemvConfig(32, 128, 2, 1, fma=True),
    Int4FusedGemvConfig(64, 128, 4, 1, split_k=4, fma=True),
    Int4FusedGemvConfig(128, 128, 8, 1, split_k=2, fma=True),
    Int4FusedGemvConfig(32, 128, 2, 1, split_k=2, fma=True),
)


@triton.jit
def _normed(x, norm_w, inv_rms, OUT_DTYPE: tl.constexpr):
    """RMSNorm of an fp32 tile as `tensorjet.kernels.norm.rms_norm` computes and rounds it."""
    return ((x * inv_rms).to(OUT_DTYPE).to(tl.float32) * norm_w.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _x_at(
    x_ptr, perm_ptr, norm_w_ptr, inv_rms, cols, k_mask, HAS_PERM: tl.constexpr, NORM: tl.constexpr,
    dtype: tl.constexpr,
):  # fmt: skip
    """x at stored columns `cols` (through the act-order permutation where there is one; 0 where
    masked) in fp32, normed where NORM and rounded to `dtype` as the product's operand is."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols, mask=k_mask, other=0)
    x = tl.load(x_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)
    if NORM:
        x = _normed(x, tl.load(norm_w_ptr + cols, mask=k_mask, other=0.0), inv_rms, dtype)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _x_slice(
    x_ptr, perm_ptr, norm_w_ptr, inv_rms, k0, k_end, J: tl.constexpr, HAS_PERM: tl.constexpr,
    NORM: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr,
):  # fmt: skip
    """The x columns nibble J of each word multiplies (`_x_at`), as the MMA's [BLOCK_K / 8, 16]
    operand: the one row broadcast to its 16 columns (every column of the product is the same)."""
    cols = k0 + tl.arange(0, BLOCK_K // 8) * 8 + J
    x = _x_at(x_ptr, perm_ptr, norm_w_ptr, inv_rms, cols, cols < k_end, HAS_PERM, NORM, dtype)
    return tl.trans(tl.broadcast_to(x.to(dtype)[None, :], (16, BLOCK_K // 8)))


@triton.jit
def _x_by_nibble(
    x_ptr, perm_ptr, norm_w_ptr, inv_rms, k0, k_end, HAS_PERM: tl.constexpr, NORM: tl.constexpr,
    BLOCK_K: tl.constexpr, dtype: tl.constexpr,
):  # fmt: skip
    """x[k0 : k0 + BLOCK_K] as `_x_slice` takes each slice, loaded (and normed) once as one row and
    split into the eight [BLOCK_K / 8] slices, nibble 0's first: one contiguous load instead of eight
    gathers, each value normed by one thread instead of by every thread whose words it multiplies."""
    cols = k0 + tl.arange(0, BLOCK_K)
    x = _x_at(x_ptr, perm_ptr, norm_w_ptr, inv_rms, cols, cols < k_end, HAS_PERM, NORM, dtype)
    x = tl.reshape(x, (BLOCK_K // 8, 2, 2, 2))  # column 8i + 4a + 2b + c
    c0, c1 = tl.split(x)
    c0b0, c0b1 = tl.split(c0)
    c1b0, c1b1 = tl.split(c1)
    x0, x4 = tl.split(c0b0)
    x2, x6 = tl.split(c0b1)
    x1, x5 = tl.split(c1b0)
    x3, x7 = tl.split(c1b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _sixteenth_codes(words, J: tl.constexpr):
    """1 + code / 16 in fp32 for nibble J of each word, exactly: the code moved to the top four bits
    of the mantissa of 1.0 (one shift and a LOP3). Sums of these times x keep the codes' share at
    fp32 precision, which codes in the low mantissa bits would lose."""
    if 4 * J <= 19:
        moved = words << (19 - 4 * J)
    else:
        moved = words >> (4 * J - 19)
    return ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _fma_tile(words, x_cols, J: tl.constexpr, part):
    """part [BLOCK_N, BLOCK_K / 8] + (1 + code / 16) x for nibble J of each word (`_sixteenth_codes`)."""
    return part + _sixteenth_codes(words, J) * x_cols[None, :]


@triton.jit
def _fma_sum(part, offset, x_word_sums, scale):
    """A tile's sum((code - zero) x) x scale per row [BLOCK_N, 1], from `_fma_tile`'s sums of
    (1 + code / 16) x: each word's share of (1 + zero / 16) sum(x) comes off first, then x 16."""
    zero = offset - 8388608.0  # `load_codes`' offset is 2^23 + zero
    part -= (1.0 + zero * 0.0625) * x_word_sums[None, :]
    return tl.sum(part, 1, keep_dims=True) * (16.0 * scale)


@triton.jit
def _int4_fused_gemv_kernel(
    x_ptr,
    qw_ptr,
    scale_ptr,
    zero_ptr,
    perm_ptr,
    b_ptr,
    norm_w_ptr,
    y_ptr,
    partial_ptr,
    arrivals_ptr,
    N,
    K,
    stride_qn,
    stride_sn,
    eps,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    SILU_MUL: tl.constexpr,
    ADD_TO_Y: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    X_BLOCK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):
    tl.static_assert(not FMA or GROUP % BLOCK_K == 0, "the FMA path needs tiles within one group")
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    dtype = y_ptr.dtype.element_ty
    wait_for_previous_kernel(PDL)
    inv_rms = 1.0
    if NORM:
        offs_x = tl.arange(0, X_BLOCK)
        sum_sq = tl.zeros((X_BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, X_BLOCK):
            x = tl.load(x_ptr + k0 + offs_x, mask=k0 + offs_x < K, other=0.0).to(tl.float32)
            sum_sq += x * x
        inv_rms = tl.rsqrt(tl.sum(sum_sq, 0) / K + eps)
    # [BLOCK_N, 16] as the MMA leaves its sums (column 0 read at the end); one column with FMAs
    acc = tl.zeros((BLOCK_N, 1 if FMA else 16), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, 1 if FMA else 16), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        words, scale, offset = load_codes(
            qw_ptr, scale_ptr, zero_ptr, offs_n, n_mask, k0, k_end, stride_qn, stride_sn,
            GROUP, HAS_ZEROS, BLOCK_K,
        )  # fmt: skip
        words_up, scale_up, offset_up = words, scale, offset
        if SILU_MUL:  # the up rows follow the N gate rows
            words_up, scale_up, offset_up = load_codes(
                qw_ptr, scale_ptr, zero_ptr, offs_n + N, n_mask, k0, k_end, stride_qn, stride_sn,
                GROUP, HAS_ZEROS, BLOCK_K,
            )  # fmt: skip
        if FMA:
            part = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
            part_up = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
            x_by_nibble = _x_by_nibble(
                x_ptr, perm_ptr, norm_w_ptr, inv_rms, k0, k_end, HAS_PERM, NORM, BLOCK_K, dtype
            )
            x_word_sums = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            for j in tl.static_range(8):
                x_cols = x_by_nibble[j]
                x_word_sums += x_cols
                part = _fma_tile(words, x_cols, j, part)
                if SILU_MUL:
                    part_up = _fma_tile(words_up, x_cols, j, part_up)
            acc += _fma_sum(part, offset, x_word_sums, scale)
            if SILU_MUL:
                acc_up += _fma_sum(part_up, offset_up, x_word_sums, scale_up)
        else:
            part = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            part_up = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            for j in tl.static_range(4):
                xt_lo = _x_slice(
                    x_ptr, perm_ptr, norm_w_ptr, inv_rms, k0, k_end, j, HAS_PERM, NORM, BLOCK_K, dtype
                )
                xt_hi = _x_slice(
                    x_ptr, perm_ptr, norm_w_ptr, inv_rms, k0, k_end, j + 4, HAS_PERM, NORM, BLOCK_K, dtype
                )
                lo, hi = slice_pair(words, offset, scale, j, PAIRS, not SCALE_AFTER, dtype)
                part += tl_dot(lo, xt_lo, DOT_PREC, UPCAST)
                part += tl_dot(hi, xt_hi, DOT_PREC, UPCAST)
                if SILU_MUL:
                    lo, hi = slice_pair(words_up, offset_up, scale_up, j, PAIRS, not SCALE_AFTER, dtype)
                    part_up += tl_dot(lo, xt_lo, DOT_PREC, UPCAST)
                    part_up += tl_dot(hi, xt_hi, DOT_PREC, UPCAST)
            if SCALE_AFTER:
                part = part * scale
                part_up = part_up * scale_up
            acc += part
            acc_up += part_up
    launch_next_kernel(PDL)
    first = tl.arange(0, 16)[None, :] == 0
    y = tl.sum(tl.where(first, acc, 0.0), 1)
    y_up = tl.sum(tl.where(first, acc_up, 0.0), 1)
    if SPLIT_K > 1:  # the block's last program to arrive adds the slices and alone runs the epilogue
        y, y_up, n_mask = reduce_row_slices(
            partial_ptr, arrivals_ptr, y, y_up, offs_n, n_mask, N, SILU_MUL, SPLIT_K
        )
    store_fused_output(y, y_up, b_ptr, y_ptr + offs_n, offs_n, n_mask, N, HAS_BIAS, SILU_MUL, ADD_TO_Y)


def int4_fused_gemv(
    x: torch.Tensor,
    weight: Int4Weight,
    bias: torch.Tensor | None = None,
    config: Int4FusedGemvConfig = CANDIDATES[0],
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """`int4_linear_reference(x, weight, bias)` for x [1, K] -> [1, N] in x's dtype, with:

    norm_weight [K]: RMSNorm(x) (weight `norm_weight`, epsilon `eps`) multiplied instead of x;
    residual [1, N]: the product added into `residual` in place, which is returned;
    silu_mul: weight and bias hold [gate; up] (2N rows); returns silu(x W_gate^T) * (x W_up^T) [1, N].
    No host synchronisation; CUDA-graph safe."""
    k = weight.in_features
    if x.dim() != 2 or x.shape != (1, k):
        raise ValueError(f"int4_fused_gemv takes x [1, {k}]; got {tuple(x.shape)}")
    if silu_mul and residual is not None:
        raise ValueError("silu_mul and residual do not combine")
    n = weight.out_features // 2 if silu_mul else weight.out_features
    x = x.contiguous()
    y = fused_output(x, n, residual)
    pdl = pdl_enabled(x.device)
    scale_after = weight.group_size % config.block_k == 0
    if not config.fits(weight):
        raise ValueError(
            f"the FMA tile needs groups of whole tiles: group {weight.group_size}, tile {config.block_k}"
        )
    row_blocks = triton.cdiv(n, config.block_n)
    partial, arrivals = split_k_buffers(y, config.split_k, config.split_k * weight.out_features, row_blocks)
    scales = weight.scales
    _int4_fused_gemv_kernel[(row_blocks, config.split_k)](
        x,
        weight.qweight,
        scales,
        weight.zeros if weight.zeros is not None else scales,
        weight.perm if weight.perm is not None else scales,
        bias if bias is not None else scales,
        norm_weight if norm_weight is not None else scales,
        y,
        partial,
        arrivals,
        n,
        k,
        weight.qweight.stride(0),
        scales.stride(0),
        eps,
        GROUP=weight.group_size,
        HAS_ZEROS=weight.zeros is not None,
        HAS_PERM=weight.perm is not None,
        HAS_BIAS=bias is not None,
        NORM=norm_weight is not None,
        SILU_MUL=silu_mul,
        ADD_TO_Y=residual is not None,
        SCALE_AFTER=scale_after,
        PAIRS=packed_pairs(x, scale_after),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        X_BLOCK=min(next_pow2(k), X_BLOCK),
        SPLIT_K=config.split_k,
        FMA=config.fma,
        DOT_PREC=dot_precision(x.dtype),
        UPCAST=dot_upcast(x.dtype),
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(pdl),
    )
    return y


def candidates_for(weight: Int4Weight) -> tuple[Int4FusedGemvConfig, ...]:
    """The candidates that can multiply `weight`: the FMA tiles only where groups hold whole tiles."""
    return tuple(c for c in CANDIDATES if c.fits(weight))


def select_int4_fused_gemv(
    weight: Int4Weight,
    bias: torch.Tensor | None,
    plain: Callable[[torch.Tensor, Int4Weight, torch.Tensor | None], torch.Tensor],
    *,
    activation_dtype: torch.dtype = torch.bfloat16,
    norm: bool = False,
    residual: bool = False,
    silu_mul: bool = False,
) -> tuple[Int4FusedGemvConfig, dict]:
    """The fastest candidate for this projection with its fusions, and the timings (ms) of it and of
    `plain` (the layer's unfused product), both at M=1 inside a CUDA graph with cold weights."""
    device = weight.qweight.device
    k = weight.in_features
    n = weight.out_features // 2 if silu_mul else weight.out_features
    x = torch.randn(1, k, dtype=activation_dtype, device=device)
    fusion = dict(
        norm_weight=torch.ones(k, dtype=activation_dtype, device=device) if norm else None,
        eps=1e-5,
        residual=torch.zeros(1, n, dtype=activation_dtype, device=device) if residual else None,
        silu_mul=silu_mul,
    )
    weights = cold_weights(weight)
    timings = {"plain": time_in_graph_ms(lambda w: plain(x, w, bias), weights)}
    best, timings["fused"] = fastest_in_graph(
        candidates_for(weight), lambda c, w: int4_fused_gemv(x, w, bias, c, **fusion), weights
    )
    return best, timings
