"""Small-batch matmul for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 16.

Decode at small batch is a bandwidth problem: every weight byte is read once per step and the math is
negligible. cuBLAS reads weights at about 2.56 TB/s at M=1 on the H200 against a 4.25 TB/s copy
rate. Here each program owns BLOCK_N output columns and streams their weight rows over K in
BLOCK_K-wide, software-pipelined tiles; x (padded to 16 rows for `tl.dot`) is re-read from L2.

Which configuration, and whether to use the kernel at all, is decided per weight shape at start-up by
timing it against `F.linear` (`select_gemv`), so the engine never runs it where cuBLAS is faster.
"""

from __future__ import annotations

import logging
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
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = acc + tl_dot(x, tl.trans(w), DOT_PREC, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig = CANDIDATES[0],
) -> torch.Tensor:
    """x [M, K] (M <= MAX_M, last dim contiguous) @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_M and weight.shape[1] == k and weight.stride(1) == 1
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=MAX_M,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_PREC=dot_precision(x.dtype),
        UPCAST=dot_upcast(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


def _time_ms(fn, *args, iters: int = 20) -> float:
    fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def select_gemv(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[GemvConfig | None, dict]:
    """Time every candidate against F.linear at M=1 and M=MAX_M on this GPU; return the fastest
    config if it beats cuBLAS at both sizes (else None), and the timings for the log."""
    n, k = weight.shape
    timings: dict = {}
    best, best_ms = None, float("inf")
    for m in (1, MAX_M):
        x = torch.randn(m, k, dtype=weight.dtype, device=weight.device)
        timings[f"cublas_m{m}"] = _time_ms(torch.nn.functional.linear, x, weight, bias)
    x1 = torch.randn(1, k, dtype=weight.dtype, device=weight.device)
    for config in CANDIDATES:
        ms = _time_ms(gemv, x1, weight, bias, config)
        if ms < best_ms:
            best, best_ms = config, ms
    timings["gemv_m1"] = best_ms
    x16 = torch.randn(MAX_M, k, dtype=weight.dtype, device=weight.device)
    timings["gemv_m16"] = _time_ms(gemv, x16, weight, bias, best)
    wins = timings["gemv_m1"] < timings["cublas_m1"] and timings["gemv_m16"] < timings[f"cublas_m{MAX_M}"]
    return (best if wins else None), timings
