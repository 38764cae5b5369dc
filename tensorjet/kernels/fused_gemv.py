"""Decode projections with the ops around them fused in: y[M, N] = x[M, K] @ W[N, K]^T, M <= 16.

At batch 1 a decoder layer is four weight GEMVs and ~9 small kernels (norms, SiLU, residual adds,
cuBLAS's split-K reduces), each costing ~2-3 us of run time and graph launch gap. This kernel takes
the small ones over:
- `norm_weight`: the product uses RMSNorm(x). The norm scales the row by one number, so the kernel
  multiplies x by the norm weight while streaming it, sums x^2 on the way, and scales the result by
  1/rms at the end: no pass over x beforehand.
- `residual`: the result is added into `residual` in place (the o and down projections).
- `silu_mul`: W holds [gate; up]; each program computes matching gate and up rows and returns
  silu(gate) * up (the gate|up projection).

For one row of x it is an FMA GEMV, not a tensor-core one: there is nothing to pad to a 16-row MMA
tile, and the weight tile goes straight from global memory into registers (no shared-memory stage).
Each program owns BLOCK_N output rows and keeps a [BLOCK_N, BLOCK_K] tile of partial sums that it
reduces once at the end. For 2-16 rows (a speculative verify step, a small decode batch) the same
fusions run around a tensor-core product W_tile @ x^T, x padded to 16 rows: the weight rows are the
MMA's long side, so on sm_90 they fill a warpgroup MMA's 64 rows, as cuBLAS's small-batch kernels lay
it out (x @ W_tile^T, x as the 16-row side, read Llama-3-8B's qkv weight at 1.7 TB/s against 2.6 on an
H100, benchmarks/gemv_rows_sweep.py). The norm's 1/rms becomes one number per row, applied to the
product's row at the end.
`tensorjet.runtime.kernel_selection.select_fused_decode` times both against the unfused layer and
uses each only where the whole layer comes out faster.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import (
    dot_precision,
    dot_upcast,
    launch_next_kernel,
    pdl_enabled,
    pdl_launch,
    tl_dot,
    wait_for_previous_kernel,
)
from tensorjet.kernels.gemv import GemvConfig, cold_copies, fastest_in_graph, time_in_graph_ms

__all__ = [
    "FusedGemvConfig",
    "CANDIDATES",
    "MAX_FUSED_ROWS",
    "ROWS_CANDIDATES",
    "fused_gemv",
    "fused_output",
    "select_fused_gemv",
    "select_fused_rows",
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

MAX_FUSED_ROWS = 16  # rows of x the tensor-core variant takes (one tl.dot tile)

# The tensor-core variant's tiles. Every program prepares the same 16 x BLOCK_K tile of x (normed where
# the norm is fused), so wide weight tiles spread that work over more weights: on sm_90 the normed
# loop costs 3-4 instructions per weight at 64-128 rows (tests/sm90_codegen.py's compile). (64, 256)
# was the fastest for every Llama-3-8B and Llama-3.2-1B projection at 2-16 rows on an H100.
ROWS_CANDIDATES = (
    GemvConfig(64, 256, 4, 3),
    GemvConfig(64, 128, 4, 4),
    GemvConfig(128, 128, 4, 4),
)


@triton.jit
def store_fused_output(
    y,
    y_up,
    b_ptr,
    y_ptrs,
    offs_n,
    y_mask,
    N,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    ADD_TO_Y: tl.constexpr,
):
    """The fused GEMVs' epilogue, from the fp32 products `y` ([BLOCK_N], or [rows, BLOCK_N]; the up
    rows' `y_up` with SILU_MUL) for output columns `offs_n`: the bias added, each product rounded to
    the activation dtype as the unfused layers round it, silu(gate) * up, the residual at `y_ptrs`
    added; the result stored at `y_ptrs` (masked by `y_mask`)."""
    dtype = y_ptrs.dtype.element_ty
    if HAS_BIAS:
        n_mask = offs_n < N
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SILU_MUL:
            y_up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = y.to(dtype)
    if SILU_MUL:
        gate = out.to(tl.float32)
        up = y_up.to(dtype).to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    if ADD_TO_Y:
        residual = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + residual).to(dtype)
    tl.store(y_ptrs, out, mask=y_mask)


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
    store_fused_output(y, y_up, b_ptr, y_ptr + offs_n, offs_n, n_mask, N, HAS_BIAS, SILU_MUL, ADD_TO_Y)


# M changes with the batch: specialising on it would compile a variant per row count.
@triton.jit(do_not_specialize=["M"])
def _fused_rows_kernel(
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
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    w_up_ptrs = w_ptr + (offs_n[:, None] + N).to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # W_tile @ x^T: transposed at the end
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # reduced once, after the loop
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:
            x = x.to(tl.float32)
            sum_sq += x * x
            x = x * tl.load(norm_w_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        x = x.to(w_ptr.dtype.element_ty)  # the MMA's operand type (bf16 where the weights are)
        w_mask = n_mask[:, None] & k_mask[None, :]
        acc += tl_dot(tl.load(w_ptrs, mask=w_mask, other=0.0), tl.trans(x), DOT_PREC, UPCAST)
        if SILU_MUL:
            acc_up += tl_dot(tl.load(w_up_ptrs, mask=w_mask, other=0.0), tl.trans(x), DOT_PREC, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        w_up_ptrs += BLOCK_K
    launch_next_kernel(PDL)
    acc = tl.trans(acc)
    acc_up = tl.trans(acc_up)
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(sum_sq, 1) / K + eps)[:, None]
        acc = acc * inv_rms
        acc_up = acc_up * inv_rms
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    store_fused_output(acc, acc_up, b_ptr, y_ptrs, offs_n, y_mask, N, HAS_BIAS, SILU_MUL, ADD_TO_Y)


def fused_output(x: torch.Tensor, n: int, residual: torch.Tensor | None) -> torch.Tensor:
    """Where a fused GEMV of x [M, K] writes its [M, n] result: `residual`, updated in place, or a new
    tensor in x's dtype."""
    m = x.shape[0]
    if residual is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if residual.shape != (m, n) or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"residual must be a contiguous [{m}, {n}] {x.dtype} tensor")
    return residual


def fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: FusedGemvConfig = CANDIDATES[0],
    *,
    rows_config: GemvConfig = ROWS_CANDIDATES[0],
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_FUSED_ROWS) @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, with:

    norm_weight [K]: RMSNorm(x) (weight `norm_weight`, epsilon `eps`) multiplied instead of x;
    residual [M, N]: the product added into `residual` in place, which is returned;
    silu_mul: weight and bias hold [gate; up] (2N rows); returns silu(x W_gate^T) * (x W_up^T) [M, N].

    One row runs the FMA kernel in `config`'s tiles, more rows the tensor-core one in `rows_config`'s.
    """
    m = x.shape[0] if x.dim() == 2 else 0
    if x.dim() != 2 or not 1 <= m <= MAX_FUSED_ROWS or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(
            f"fused_gemv takes x [M, K] with 1 <= M <= {MAX_FUSED_ROWS} and a row-major weight [N, K]; "
            f"got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if silu_mul and residual is not None:
        raise ValueError("silu_mul and residual do not combine")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    x = x.contiguous()
    y = fused_output(x, n, residual)
    pdl = pdl_enabled(x.device)
    operands = (
        x,
        weight,
        bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        y,
    )
    fusions = dict(
        HAS_BIAS=bias is not None,
        NORM=norm_weight is not None,
        SILU_MUL=silu_mul,
        ADD_TO_Y=residual is not None,
    )
    if m == 1:
        _fused_gemv_kernel[(triton.cdiv(n, config.block_n),)](
            *operands,
            n,
            x.shape[1],
            weight.stride(0),
            eps,
            **fusions,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            PDL=pdl,
            num_warps=config.num_warps,
            **({} if config.num_stages is None else {"num_stages": config.num_stages}),
            **pdl_launch(pdl),
        )
        return y
    _fused_rows_kernel[(triton.cdiv(n, rows_config.block_n),)](
        *operands,
        m,
        n,
        x.shape[1],
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        eps,
        **fusions,
        BLOCK_M=MAX_FUSED_ROWS,
        BLOCK_N=rows_config.block_n,
        BLOCK_K=rows_config.block_k,
        DOT_PREC=dot_precision(x.dtype),
        UPCAST=dot_upcast(x.dtype),
        PDL=pdl,
        num_warps=rows_config.num_warps,
        num_stages=_stages_on(x.device, rows_config, x.element_size(), silu_mul),
        **pdl_launch(pdl),
    )
    return y


def stages_that_fit(config: GemvConfig, element_size: int, silu_mul: bool, shared_memory: int) -> int:
    """config.num_stages, or fewer where that many copies of the x and weight tiles (two weight tiles
    with silu_mul) would not fit `shared_memory` bytes (fp32 tiles, or a smaller GPU)."""
    per_stage = (MAX_FUSED_ROWS + config.block_n * (2 if silu_mul else 1)) * config.block_k * element_size
    # The pipeline keeps num_stages copies (both MMA operands are read from shared memory); 16 KiB is
    # left for the rest of the kernel.
    return max(1, min(config.num_stages, (shared_memory - 16 * 2**10) // per_stage))


@functools.cache
def _stages_on(device: torch.device, config: GemvConfig, element_size: int, silu_mul: bool) -> int:
    """`stages_that_fit` on `device`, looked up once per launch shape (eager steps launch it per step)."""
    if device.type != "cuda":
        return config.num_stages
    shared_memory = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return stages_that_fit(config, element_size, silu_mul, shared_memory)


def _fusion_inputs(weight: torch.Tensor, rows: int, norm: bool, residual: bool, silu_mul: bool) -> dict:
    """`fused_gemv`'s fusion arguments for timing `rows` rows: unit norm weights, a zero residual."""
    n, k = weight.shape
    like = dict(dtype=weight.dtype, device=weight.device)
    return dict(
        norm_weight=torch.ones(k, **like) if norm else None,
        eps=1e-5,
        residual=torch.zeros(rows, n, **like) if residual else None,
        silu_mul=silu_mul,
    )


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
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    fusion = _fusion_inputs(weight, 1, norm, residual, silu_mul)
    timings = {"cublas": time_in_graph_ms(lambda w: torch.nn.functional.linear(x, w, bias), weights)}
    best, timings["fused"] = fastest_in_graph(
        CANDIDATES, lambda c, w: fused_gemv(x, w, bias, c, **fusion), weights
    )
    return best, timings


def select_fused_rows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plain,
    rows: tuple[int, ...],
    *,
    norm: bool = False,
    residual: bool = False,
    silu_mul: bool = False,
) -> tuple[GemvConfig, dict[int, tuple[float, float]]]:
    """The fastest tensor-core candidate for this projection with its fusions at MAX_FUSED_ROWS rows,
    and by each of `rows`, the times (ms) of it and of the layer's `plain(x, weight, bias)` product,
    inside a CUDA graph with weights read from HBM."""
    weights = cold_copies(weight)
    like = dict(dtype=weight.dtype, device=weight.device)
    fusion = _fusion_inputs(weight, MAX_FUSED_ROWS, norm, residual, silu_mul)
    x = torch.randn(MAX_FUSED_ROWS, weight.shape[1], **like)
    best, _ = fastest_in_graph(
        ROWS_CANDIDATES, lambda c, w: fused_gemv(x, w, bias, rows_config=c, **fusion), weights
    )
    timings = {}
    for m in rows:
        x = torch.randn(m, weight.shape[1], **like)
        fusion = _fusion_inputs(weight, m, norm, residual, silu_mul)
        fused = time_in_graph_ms(
            lambda w, x=x, f=fusion: fused_gemv(x, w, bias, rows_config=best, **f), weights
        )
        timings[m] = (fused, time_in_graph_ms(lambda w, x=x: plain(x, w, bias), weights))
    return best, timings
