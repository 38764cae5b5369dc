"""Batch-1 decode projections with the ops around them fused in: y[N] = x[K] @ W[N, K]^T.

At batch 1 a decoder layer is four weight GEMVs and ~9 small kernels (norms, SiLU, residual adds,
cuBLAS's split-K reduces), each costing ~2-3 us of run time and graph launch gap. This kernel takes
the small ones over:
- `norm_weight`: the product uses RMSNorm(x). The norm scales the row by one number, so the kernel
  multiplies x by the norm weight while streaming it, sums x^2 on the way, and scales the result by
  1/rms at the end: no pass over x beforehand.
- `residual`: the result is added into `residual` in place (the o and down projections).
- `silu_mul`: W holds [gate; up]; each program computes matching gate and up rows and returns
  silu(gate) * up (the gate|up projection).

It is an FMA GEMV, not a tensor-core one: with one row of x there is nothing to pad to a 16-row MMA
tile, and the weight tile goes straight from global memory into registers (no shared-memory stage).
Each program owns BLOCK_N output rows and keeps a [BLOCK_N, BLOCK_K] tile of partial sums that it
reduces once at the end. `tensorjet.runtime.kernel_selection.select_fused_decode` times it against
cuBLAS plus the kernels it replaces and uses it only where the whole layer comes out faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import launch_next_kernel, pdl_enabled, pdl_launch, wait_for_previous_kernel
from tensorjet.kernels.gemv import cold_copies, fastest_in_graph, time_in_graph_ms

__all__ = [
    "FusedGemvConfig",
    "CANDIDATES",
    "fused_gemv",
    "fused_output",
    "select_fused_gemv",
    "store_fused_output",
]


@dataclass(frozen=True)
class FusedGemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default software pipelining depth


# Each is the fastest of 32 tile/warp/pipelining configurations for some Llama-3-8B projection on the
# H200 (benchmarks/gemv_sweep.py, 2026-11-29, graph-timed, L2-cold): (16, 512) for qkv (14.7 us),
# (4, 2048) for o and down (10.8, 29.6 us), (4, 1024) for gate|up (58.7 us); Triton's pipelining depth
# made no difference. Each candidate is one more compile at start-up.
CANDIDATES = (
    FusedGemvConfig(16, 512, 4),
    FusedGemvConfig(4, 2048, 4),
    FusedGemvConfig(4, 1024, 4),
)


@triton.jit
def store_fused_output(
    y,
    y_up,
    b_ptr,
    y_ptr,
    offs_n,
    n_mask,
    N,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    ADD_TO_Y: tl.constexpr,
):
    """The fused GEMVs' epilogue, from the fp32 products `y` (and the up rows' `y_up` with SILU_MUL):
    the bias added, each product rounded to the activation dtype as the unfused layers round it,
    silu(gate) * up, the residual at y_ptr added; the result stored at y_ptr."""
    dtype = y_ptr.dtype.element_ty
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SILU_MUL:
            y_up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = y.to(dtype)
    if SILU_MUL:
        gate = out.to(tl.float32)
        up = y_up.to(dtype).to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    if ADD_TO_Y:
        residual = tl.load(y_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + residual).to(dtype)
    tl.store(y_ptr + offs_n, out, mask=n_mask)


@triton.jit
def _fused_gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    norm_w_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    eps,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    SILU_MUL: tl.constexpr,
    ADD_TO_Y: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    # SILU_MUL: the up rows follow the N gate rows.
    w_up_ptrs = w_ptr + (offs_n[:, None] + N).to(tl.int64) * stride_wn + offs_k[None, :]
    # Each iteration multiplies the weight tile loaded by the one before and loads the next, so a tile
    # is always in flight; the first is loaded before waiting on the kernel that writes x.
    w_mask = n_mask[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_up = w
    if SILU_MUL:
        w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
    wait_for_previous_kernel(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if NORM:
            sum_sq += x * x
            x = x * tl.load(norm_w_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if SILU_MUL:
            acc_up += w_up.to(tl.float32) * x[None, :]
        w_ptrs += BLOCK_K
        w_up_ptrs += BLOCK_K
        w_mask = n_mask[:, None] & (k0 + BLOCK_K + offs_k < K)[None, :]  # past the end: loads nothing
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if SILU_MUL:
            w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
    launch_next_kernel(PDL)
    y = tl.sum(acc, 1)
    y_up = tl.sum(acc_up, 1)
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(sum_sq, 0) / K + eps)
        y = y * inv_rms
        y_up = y_up * inv_rms
    store_fused_output(y, y_up, b_ptr, y_ptr, offs_n, n_mask, N, HAS_BIAS, SILU_MUL, ADD_TO_Y)


def fused_output(x: torch.Tensor, n: int, residual: torch.Tensor | None) -> torch.Tensor:
    """Where a fused GEMV of x [1, K] writes its [1, n] result: `residual`, updated in place, or a new
    tensor in x's dtype."""
    if residual is None:
        return torch.empty((1, n), dtype=x.dtype, device=x.device)
    if residual.shape != (1, n) or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"residual must be a contiguous [1, {n}] {x.dtype} tensor")
    return residual


def fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: FusedGemvConfig = CANDIDATES[0],
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype, with:

    norm_weight [K]: RMSNorm(x) (weight `norm_weight`, epsilon `eps`) multiplied instead of x;
    residual [1, N]: the product added into `residual` in place, which is returned;
    silu_mul: weight and bias hold [gate; up] (2N rows); returns silu(x W_gate^T) * (x W_up^T) [1, N].
    """
    if x.dim() != 2 or x.shape[0] != 1 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(
            f"fused_gemv takes x [1, K] and a row-major weight [N, K]; got {x.shape}, {weight.shape}"
        )
    if silu_mul and residual is not None:
        raise ValueError("silu_mul and residual do not combine")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    x = x.contiguous()
    y = fused_output(x, n, residual)
    pdl = pdl_enabled(x.device)
    _fused_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        y,
        n,
        x.shape[1],
        weight.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        NORM=norm_weight is not None,
        SILU_MUL=silu_mul,
        ADD_TO_Y=residual is not None,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        PDL=pdl,
        num_warps=config.num_warps,
        **({} if config.num_stages is None else {"num_stages": config.num_stages}),
        **pdl_launch(pdl),
    )
    return y


def select_fused_gemv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    norm: bool = False,
    residual: bool = False,
    silu_mul: bool = False,
) -> tuple[FusedGemvConfig, dict]:
    """The fastest candidate for this projection with its fusions, and the timings (ms) of it and of
    cuBLAS's plain `F.linear`, both at M=1 inside a CUDA graph with weights read from HBM."""
    weights = cold_copies(weight)
    n, k = weight.shape
    x = torch.randn(1, k, dtype=weight.dtype, device=weight.device)
    fusion = dict(
        norm_weight=torch.ones(k, dtype=weight.dtype, device=weight.device) if norm else None,
        eps=1e-5,
        residual=torch.zeros(1, n, dtype=weight.dtype, device=weight.device) if residual else None,
        silu_mul=silu_mul,
    )
    timings = {"cublas": time_in_graph_ms(lambda w: torch.nn.functional.linear(x, w, bias), weights)}
    best, timings["fused"] = fastest_in_graph(
        CANDIDATES, lambda c, w: fused_gemv(x, w, bias, c, **fusion), weights
    )
    return best, timings
