"""Batch-1 FP8 decode projections with the ops around them fused in: `fused_gemv` for an E4M3 weight.

y[N] = x[K] @ W[N, K]^T with W in E4M3 (one float32 scale per output row) and x quantized to E4M3
inside the kernel, as `fp8_linear_reference` does, optionally with:
- `norm_weight`: the product uses RMSNorm(x); the normed row (rounded to x's dtype as the norm
  kernel stores it) is what gets quantized, so the kernel makes passes over x for its sum of squares
  and (dynamic scale) its absolute maximum before the main loop. x is one row: the passes read it
  from cache while the first weight tile is already on its way;
- `residual`: the result added into `residual` in place (the o and down projections);
- `silu_mul`: W holds [gate; up]; returns silu(gate) * up (the gate|up projection).

Two main loops, chosen by the tile configuration (`select_fp8_fused_gemv` times both kinds):
- FMA, as `fused_gemv`: each program owns a few output rows, keeps [BLOCK_N, BLOCK_K] fp32 partial
  sums (E4M3 products are exact in fp32) and reduces them once at the end; the weight tile goes from
  global memory straight into registers, one byte per value. Converting each byte to fp32 costs
  several instructions, so this loop is instruction-bound before it is bandwidth-bound;
- tensor cores: W [64+ rows, BLOCK_K] @ xq^T on the FP8 MMA with the one row of x broadcast to its
  16 columns (`tensorjet.kernels.fp8_linear`'s numerics): few instructions per byte, but only
  N / BLOCK_N programs, too few to stream a 4096-row weight at the full rate, unless
- split over K (SPLIT_K > 1): SPLIT_K programs per row block each sum a slice of K into an fp32
  scratch row; the last of them to finish (an atomic counter per row block) adds the slices in a
  fixed order and runs the epilogue, so the result does not depend on which program came last, and
  the whole product stays one launch. Every program still reads all of x for its scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import (
    interpreting,
    launch_next_kernel,
    next_pow2,
    pdl_enabled,
    pdl_launch,
    wait_for_previous_kernel,
)
from tensorjet.kernels.fp8_linear import (
    PROMOTE_K,
    X_BLOCK,
    quantize_e4m3,
    row_scale,
    scaled_mm_linear,
)
from tensorjet.kernels.fp8_reference import E4M3
from tensorjet.kernels.fused_gemv import fused_output, store_fused_output
from tensorjet.kernels.gemv import cold_copies, fastest_in_graph, time_in_graph_ms
from tensorjet.kernels.split_k import reduce_row_slices, split_k_buffers

__all__ = ["CANDIDATES", "Fp8FusedGemvConfig", "fp8_fused_gemv", "select_fp8_fused_gemv"]


@dataclass(frozen=True)
class Fp8FusedGemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default software pipelining depth
    # The FP8 tensor cores (W as the MMA's 64+-row operand, x broadcast to 16 columns) instead of
    # FMAs: far fewer instructions per weight byte, but BLOCK_N >= 64 leaves N / 64 programs.
    tensor_cores: bool = False
    split_k: int = 1  # programs per row block, each over a slice of K


# The fastest of 31 FMA and tensor-core tiles per Llama-3-8B projection with its fusion on an H100
# (graph-timed, L2-cold, 2026-12-06; benchmarks/results/fp8_fused_sweep_h100_2026-12-06.json), as a
# fraction of the copy rate: o 9.5 us (0.59) and down 28.6 us (0.69) on FMAs (16, 512, 8 warps; 4
# warps 2-4% slower), qkv 12.7 us (0.66) on tensor cores (64, 128, 6 stages; FMAs 12.8), gate|up
# 43.8 us (0.89) on tensor cores (128, 256, 3 stages; FMAs 52.3). Tensor-core tiles over 64 x 256
# at 4+ stages run out of shared memory.
CANDIDATES = (
    Fp8FusedGemvConfig(16, 512, 4),
    Fp8FusedGemvConfig(16, 512, 8),
    Fp8FusedGemvConfig(64, 128, 4, 6, tensor_cores=True),
    Fp8FusedGemvConfig(128, 256, 4, 3, tensor_cores=True),
    # Split over K: enough programs for the 4096-row o and down projections on the tensor cores.
    Fp8FusedGemvConfig(64, 256, 4, 3, tensor_cores=True, split_k=2),
    Fp8FusedGemvConfig(64, 256, 4, 3, tensor_cores=True, split_k=4),
    Fp8FusedGemvConfig(64, 128, 4, 6, tensor_cores=True, split_k=4),
)


@triton.jit
def _normed(x, norm_w, inv_rms, OUT_DTYPE: tl.constexpr):
    """RMSNorm of an fp32 tile as `tensorjet.kernels.norm.rms_norm` computes and rounds it."""
    return ((x * inv_rms).to(OUT_DTYPE).to(tl.float32) * norm_w.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _fp8_fused_gemv_kernel(
    x_ptr,
    w_ptr,
    w_scale_ptr,
    b_ptr,
    in_scale_ptr,
    norm_w_ptr,
    y_ptr,
    partial_ptr,
    arrivals_ptr,
    N,
    K,
    stride_wn,
    eps,
    HAS_BIAS: tl.constexpr,
    STATIC: tl.constexpr,
    NORM: tl.constexpr,
    SILU_MUL: tl.constexpr,
    ADD_TO_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    X_BLOCK: tl.constexpr,
    TENSOR_CORES: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PROMOTE: tl.constexpr,
    EMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # This program's slice of K: [k_begin, k_end), whole BLOCK_K tiles but for the last slice.
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    offs_k = tl.arange(0, BLOCK_K)
    offs_x = tl.arange(0, X_BLOCK)
    n_mask = offs_n < N
    dtype = y_ptr.dtype.element_ty
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + k_begin + offs_k[None, :]
    # SILU_MUL: the up rows follow the N gate rows.
    w_up_ptrs = w_ptr + (offs_n[:, None] + N).to(tl.int64) * stride_wn + k_begin + offs_k[None, :]
    if not TENSOR_CORES:
        # Each iteration multiplies the weight tile loaded by the one before and loads the next, so a
        # tile is always in flight; the first is loaded before waiting on the kernel that writes x.
        w_mask = n_mask[:, None] & (k_begin + offs_k < k_end)[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        w_up = w
        if SILU_MUL:
            w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
    wait_for_previous_kernel(PDL)
    # The passes over x before the product read it in X_BLOCK-wide tiles (wider than the weight's):
    # each is a round trip to cache that nothing else overlaps.
    inv_rms = 1.0
    if NORM:
        sum_sq = tl.zeros((X_BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, X_BLOCK):
            x = tl.load(x_ptr + k0 + offs_x, mask=k0 + offs_x < K, other=0.0).to(tl.float32)
            sum_sq += x * x
        inv_rms = tl.rsqrt(tl.sum(sum_sq, 0) / K + eps)
    if STATIC:
        x_scale = tl.load(in_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((X_BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, X_BLOCK):
            x_mask = k0 + offs_x < K
            x = tl.load(x_ptr + k0 + offs_x, mask=x_mask, other=0.0).to(tl.float32)
            if NORM:
                x = _normed(x, tl.load(norm_w_ptr + k0 + offs_x, mask=x_mask, other=0.0), inv_rms, dtype)
            amax = tl.maximum(amax, tl.abs(x))
        x_scale = row_scale(tl.max(amax, 0))
    inv_scale = tl.math.div_rn(1.0, x_scale)
    if TENSOR_CORES:
        # W [BLOCK_N, K] @ xq^T on the FP8 tensor cores, the row broadcast to the MMA's 16 columns
        # (every column of the product is the same; the first is kept).
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_mask = (k0 + offs_k) < k_end
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if NORM:
                x = _normed(x, tl.load(norm_w_ptr + k0 + offs_k, mask=k_mask, other=0.0), inv_rms, dtype)
            xq = tl.trans(
                tl.broadcast_to(quantize_e4m3(x, x_scale, inv_scale, EMULATE)[None, :], (16, BLOCK_K))
            )
            w_mask = n_mask[:, None] & k_mask[None, :]
            w = tl.load(w_ptrs + (k0 - k_begin), mask=w_mask, other=0.0)
            acc = tl.dot(w, xq, acc, max_num_imprecise_acc=PROMOTE)
            if SILU_MUL:
                w_up = tl.load(w_up_ptrs + (k0 - k_begin), mask=w_mask, other=0.0)
                acc_up = tl.dot(w_up, xq, acc_up, max_num_imprecise_acc=PROMOTE)
        launch_next_kernel(PDL)
        first = tl.arange(0, 16)[None, :] == 0
        y = tl.sum(tl.where(first, acc, 0.0), 1)
        y_up = tl.sum(tl.where(first, acc_up, 0.0), 1)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_mask = (k0 + offs_k) < k_end
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if NORM:
                x = _normed(x, tl.load(norm_w_ptr + k0 + offs_k, mask=k_mask, other=0.0), inv_rms, dtype)
            xq = quantize_e4m3(x, x_scale, inv_scale, EMULATE).to(tl.float32)
            # E4M3 x E4M3 products are exact in fp32.
            acc += w.to(tl.float32) * xq[None, :]
            if SILU_MUL:
                acc_up += w_up.to(tl.float32) * xq[None, :]
            w_ptrs += BLOCK_K
            w_up_ptrs += BLOCK_K
            w_mask = n_mask[:, None] & (k0 + BLOCK_K + offs_k < k_end)[None, :]  # past the end: nothing
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            if SILU_MUL:
                w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
        launch_next_kernel(PDL)
        y = tl.sum(acc, 1)
        y_up = tl.sum(acc_up, 1)
    if SPLIT_K > 1:  # the block's last program to arrive adds the slices and alone runs the epilogue
        y, y_up, n_mask = reduce_row_slices(
            partial_ptr, arrivals_ptr, y, y_up, offs_n, n_mask, N, SILU_MUL, SPLIT_K
        )
    y = y * x_scale * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    if SILU_MUL:
        y_up = y_up * x_scale * tl.load(w_scale_ptr + N + offs_n, mask=n_mask, other=0.0)
    store_fused_output(y, y_up, b_ptr, y_ptr + offs_n, offs_n, n_mask, N, HAS_BIAS, SILU_MUL, ADD_TO_Y)


def fp8_fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    config: Fp8FusedGemvConfig = CANDIDATES[0],
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """`fp8_linear_reference(x, weight, weight_scale, bias, input_scale)` for x [1, K] -> [1, N] in
    x's dtype (weight [N, K] E4M3 row major, weight_scale [N] float32), with:

    norm_weight [K]: RMSNorm(x) (weight `norm_weight`, epsilon `eps`) quantized and multiplied
        instead of x;
    residual [1, N]: the product added into `residual` in place, which is returned;
    silu_mul: weight, weight_scale and bias hold [gate; up] (2N rows); returns
        silu(x W_gate^T) * (x W_up^T) [1, N].
    """
    if x.dim() != 2 or x.shape[0] != 1 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(
            f"fp8_fused_gemv takes x [1, K] and a row-major weight [N, K]; got {x.shape}, {weight.shape}"
        )
    if weight.dtype != E4M3 or weight_scale.shape != (weight.shape[0],):
        raise ValueError(
            f"weight must be E4M3 with a scale per row; got {weight.dtype}, {weight_scale.shape}"
        )
    if silu_mul and residual is not None:
        raise ValueError("silu_mul and residual do not combine")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    x = x.contiguous()
    y = fused_output(x, n, residual)
    pdl = pdl_enabled(x.device)
    row_blocks = triton.cdiv(n, config.block_n)
    partial, arrivals = split_k_buffers(y, config.split_k, config.split_k * weight.shape[0], row_blocks)
    _fp8_fused_gemv_kernel[(row_blocks, config.split_k)](
        x,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        input_scale if input_scale is not None else weight_scale,
        norm_weight if norm_weight is not None else weight_scale,
        y,
        partial,
        arrivals,
        n,
        x.shape[1],
        weight.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        STATIC=input_scale is not None,
        NORM=norm_weight is not None,
        SILU_MUL=silu_mul,
        ADD_TO_Y=residual is not None,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        X_BLOCK=min(next_pow2(x.shape[1]), X_BLOCK),
        TENSOR_CORES=config.tensor_cores,
        SPLIT_K=config.split_k,
        PROMOTE=min(PROMOTE_K, config.block_k),
        EMULATE=interpreting(),
        PDL=pdl,
        num_warps=config.num_warps,
        **({} if config.num_stages is None else {"num_stages": config.num_stages}),
        **pdl_launch(pdl),
    )
    return y


def select_fp8_fused_gemv(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
    *,
    activation_dtype: torch.dtype = torch.bfloat16,
    norm: bool = False,
    residual: bool = False,
    silu_mul: bool = False,
) -> tuple[Fp8FusedGemvConfig, dict]:
    """The fastest candidate for this projection with its fusions, and the timings (ms) of it and of
    the plain `scaled_mm_linear`, both at M=1 inside a CUDA graph with weights read from HBM."""
    weights = cold_copies(weight)
    n, k = weight.shape
    x = torch.randn(1, k, dtype=activation_dtype, device=weight.device)
    fusion = dict(
        norm_weight=torch.ones(k, dtype=activation_dtype, device=weight.device) if norm else None,
        eps=1e-5,
        residual=torch.zeros(1, n, dtype=activation_dtype, device=weight.device) if residual else None,
        silu_mul=silu_mul,
    )
    timings = {
        "scaled_mm": time_in_graph_ms(
            lambda w: scaled_mm_linear(x, w, weight_scale, bias, input_scale), weights
        )
    }
    best, timings["fused"] = fastest_in_graph(
        CANDIDATES,
        lambda c, w: fp8_fused_gemv(x, w, weight_scale, bias, input_scale, c, **fusion),
        weights,
    )
    return best, timings
