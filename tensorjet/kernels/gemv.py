"""Small-batch matmul for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 16, with the ops around
a decoder layer's projections fused in.

Decode at small batch is a bandwidth problem: every weight byte is read once per step and the math is
negligible. Each program owns BLOCK_N output columns and streams their weight rows over K in
BLOCK_K-wide, software-pipelined tiles; x (padded to 16 rows for `tl.dot`) is re-read from L2.

At batch 1 the projections read weights at about the copy rate whoever runs them (cuBLAS or this
kernel); what costs time is the small kernels between them, ~3 us each with their launch gap. So the
kernel takes over their work:
- `norm_weight`: x is the residual stream and the product uses RMSNorm(x). Since the norm scales each
  row by one number, the kernel multiplies x by the norm weight while streaming, sums x^2 on the way,
  and scales the result by the row's 1/rms at the end: no pass over x beforehand.
- `residual`: the result is added into `residual` in place (the o and down projections).
- `silu_mul`: W holds [gate; up] and the result is silu(gate) * up (the gate|up projection).
Each fusion replaces one launch per layer; at batch 1 on Llama-3-8B the layer goes from 13 to 8.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import dot_precision, dot_upcast, tl_dot
from tensorjet.kernels.reference import gemv_ref

__all__ = ["GemvConfig", "gemv", "gemv_ref", "select_gemv", "MAX_M"]

logger = logging.getLogger(__name__)

MAX_M = 16  # rows of x one launch handles (the tl.dot minimum)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


CANDIDATES = (
    GemvConfig(16, 256, 4, 4),
    GemvConfig(32, 256, 4, 3),
    GemvConfig(16, 512, 4, 3),
    GemvConfig(64, 128, 4, 4),
)


# M changes with the batch: specialising on M == 1 would compile a second variant of every config.
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    norm_w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    eps,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    SILU_MUL: tl.constexpr,
    ADD_TO_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    # SILU_MUL: the up rows follow the N gate rows.
    w_up_ptrs = w_ptr + (offs_n[:, None] + N).to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, 1)
            g = tl.load(norm_w_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = acc + tl_dot(x, tl.trans(w), DOT_PREC, UPCAST)
        if SILU_MUL:
            w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
            acc_up = acc_up + tl_dot(x, tl.trans(w_up), DOT_PREC, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        w_up_ptrs += BLOCK_K
    if NORM:
        inv_rms = tl.rsqrt(sum_sq / K + eps)
        acc = acc * inv_rms[:, None]
        acc_up = acc_up * inv_rms[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # Round each product to the activation dtype before the next op, as the unfused layers do.
    y = acc.to(y_ptr.dtype.element_ty)
    if SILU_MUL:
        gate = y.to(tl.float32)
        up = acc_up.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate)) * up).to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if ADD_TO_Y:
        y = (y.to(tl.float32) + tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)).to(y.dtype)
    tl.store(y_ptrs, y, mask=y_mask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig = CANDIDATES[0],
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_M, last dim contiguous) @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype.

    norm_weight [K]: multiply RMSNorm(x) (weight `norm_weight`, epsilon `eps`) instead of x.
    residual [M, N]: add the product into `residual` in place and return it.
    silu_mul: weight and bias hold [gate; up] (2N rows); return silu(x W_gate^T) * (x W_up^T) [M, N].
    """
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    assert m <= MAX_M and weight.shape[1] == k and weight.stride(1) == 1
    assert not (silu_mul and residual is not None), "silu_mul and residual do not combine"
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None:
        assert residual.shape == (m, n) and residual.dtype == x.dtype and residual.stride(1) == 1
        y = residual
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        y,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        NORM=norm_weight is not None,
        SILU_MUL=silu_mul,
        ADD_TO_Y=residual is not None,
        BLOCK_M=MAX_M,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_PREC=dot_precision(x.dtype),
        UPCAST=dot_upcast(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


def _time_ms(fn, weights: list[torch.Tensor], x: torch.Tensor, bias, *args, iters: int = 24) -> float:
    """Mean time of fn(x, weight, bias, *args), cycling through `weights` so nothing comes from L2."""
    fn(x, weights[0], bias, *args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(iters):
        fn(x, weights[i % len(weights)], bias, *args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def select_gemv(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[GemvConfig, dict]:
    """Time every candidate at M=1 on this GPU and return the fastest, with the timings (cuBLAS's
    too, for the log). Weight copies totalling >= 256 MiB are cycled so each launch reads from HBM,
    as in a real step, instead of from a warm L2."""
    copies = min(8, max(1, math.ceil(256 * 2**20 / (weight.numel() * weight.element_size()))))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    x1 = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    timings = {"cublas_m1": _time_ms(torch.nn.functional.linear, weights, x1, bias)}
    best, best_ms = CANDIDATES[0], float("inf")
    for config in CANDIDATES:
        ms = _time_ms(gemv, weights, x1, bias, config)
        if ms < best_ms:
            best, best_ms = config, ms
    timings["gemv_m1"] = best_ms
    return best, timings
