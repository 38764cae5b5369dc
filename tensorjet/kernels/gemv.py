"""Small-batch matmul for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 16.

Decode at small batch is a bandwidth problem: every weight byte is read once per step and the math is
negligible. cuBLAS reads weights at about 2.56 TB/s at M=1 on the H200 against a 4.25 TB/s copy
rate. Here each program owns BLOCK_N output columns and streams their weight rows over K in
BLOCK_K-wide, software-pipelined tiles; x (padded to 16 rows for `tl.dot`) is re-read from L2.

Which configuration, and for which row counts to use the kernel at all, is decided per weight shape at
start-up by timing it against `F.linear` (`select_gemv`), so the engine runs it only where it measured
faster than cuBLAS.
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

__all__ = ["GemvConfig", "gemv", "gemv_ref", "select_gemv", "MAX_M", "SELECTION_ROWS"]

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


def cold_copies(weight: torch.Tensor, total_bytes: int = 256 * 2**20) -> list[torch.Tensor]:
    """`weight` and clones of it, >= `total_bytes` in all (at most 8): cycling through them in a timing
    loop keeps each read coming from HBM instead of the L2 a repeated read would hit."""
    copies = min(8, max(1, math.ceil(total_bytes / (weight.numel() * weight.element_size()))))
    return [weight] + [weight.clone() for _ in range(copies - 1)]


def time_in_graph_ms(launch, weights: list[torch.Tensor], launches: int = 24, replays: int = 3) -> float:
    """GPU time per `launch(weight)` inside a CUDA graph (no Python launch cost, as in a decode step),
    cycling through `weights` so every launch reads its weight from HBM rather than a warm L2."""
    launch(weights[0])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            launch(weights[i % len(weights)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (launches * replays)


def fastest_in_graph(candidates, launch, weights: list[torch.Tensor]) -> tuple:
    """(the candidate whose `launch(candidate, weight)` takes least GPU time, that time in ms), each
    timed by `time_in_graph_ms` over `weights`."""
    timed = [(time_in_graph_ms(lambda w, c=c: launch(c, w), weights), i) for i, c in enumerate(candidates)]
    best_ms, best = min(timed)
    return candidates[best], best_ms


def fastest_by_rows(candidates, rows: tuple[int, ...], x_like: tuple, launch, weights: list) -> tuple:
    """The fastest of `candidates` at each of `rows` (ascending): `launch(candidate, x, weight)` timed by
    `fastest_in_graph` over `weights`, x random [rows, in_features] of `x_like` = (in_features, dtype,
    device). Returns ((rows, candidate), ...) and the times (ms) by rows."""
    in_features, dtype, device = x_like
    tiles, timings = [], {}
    for m in rows:
        x = torch.randn(m, in_features, dtype=dtype, device=device)
        best, timings[m] = fastest_in_graph(candidates, lambda c, w, x=x: launch(c, x, w), weights)
        tiles.append((m, best))
    return tuple(tiles), timings


# The batch sizes `select_gemv` times: decode steps, verify steps of a few drafts, small batches.
SELECTION_ROWS = (1, 2, 4, 8, MAX_M)


def select_gemv(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[GemvConfig, dict[int, tuple[float, float]]]:
    """The fastest candidate at M=1 on this GPU, and its time against F.linear's at each of
    SELECTION_ROWS: {rows: (GEMV ms, cuBLAS ms)}. cuBLAS picks another kernel per row count (at a few
    rows some read the weights at half the copy rate), so the caller takes the GEMV only where it wins.

    Launches are timed inside a CUDA graph, as a decode step runs them: timed one by one from Python,
    a 10 us kernel measures its launch cost instead (Triton's launcher is slower than cuBLAS's). Weight
    copies totalling >= 256 MiB are cycled so each launch reads its weight from HBM."""
    weights = cold_copies(weight)
    xs = {
        m: torch.randn(m, weight.shape[1], dtype=weight.dtype, device=weight.device) for m in SELECTION_ROWS
    }
    best, gemv_m1 = fastest_in_graph(CANDIDATES, lambda c, w: gemv(xs[1], w, bias, c), weights)
    timings = {}
    for m, x in xs.items():
        gemv_ms = gemv_m1 if m == 1 else time_in_graph_ms(lambda w, x=x: gemv(x, w, bias, best), weights)
        cublas_ms = time_in_graph_ms(lambda w, x=x: torch.nn.functional.linear(x, w, bias), weights)
        timings[m] = (gemv_ms, cublas_ms)
    return best, timings
