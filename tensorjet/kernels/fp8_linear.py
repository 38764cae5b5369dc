"""FP8 (E4M3) W8A8 linear products: y[M, N] = x[M, K] @ W[N, K]^T with both sides in E4M3.

The weight is E4M3 with one float32 scale per output channel; the activation is quantized per token
(its row's absolute maximum maps to 448) or with a checkpoint's static scale. The numerics are the
reference's (`tensorjet.kernels.fp8_reference`, pure PyTorch): every kernel here computes the same quantized
values (bit for bit, the division included) and the same fp32 epilogue, and differs from it only in
how its sums run: in another order and, on Hopper's FP8 tensor cores (the Triton GEMV/GEMM and
torch._scaled_mm alike), with each instruction's 32 products added at less than fp32 precision
before they join the fp32 accumulator (every PROMOTE_K of K), about 1e-4 relative.
- `fp8_gemv` (up to MAX_M rows, the decode batches): reads the E4M3 weight (half the bytes of bf16)
  and quantizes x inside the kernel, so a projection stays one launch;
- `fp8_gemm` (tens to hundreds of rows): x quantized once, then the same kernel on larger tiles;
- `scaled_mm_linear` (any M, sm89+): one launch quantizes x (`quantize_per_token_triton`), then
  torch._scaled_mm multiplies on the FP8 tensor cores with row-wise scales.
`select_fp8_gemv` times the GEMV's tiles against `scaled_mm_linear` per weight shape at start-up.
The fused batch-1 decode layer's FP8 projections are `tensorjet.kernels.fp8_fused_gemv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tensorjet.dtypes import FP8_MAX
from tensorjet.kernels._common import interpreting, next_pow2, num_sms, supports_e4m3_cvt
from tensorjet.kernels.fp8_reference import E4M3, MIN_AMAX
from tensorjet.kernels.gemv import (
    SELECTION_ROWS,
    cold_copies,
    fastest_by_rows,
    fastest_in_graph,
    time_in_graph_ms,
)
from tensorjet.kernels.split_k import reduce_tile_slices, split_k_buffers

__all__ = [
    "CANDIDATES",
    "GEMM_MAX_M",
    "MAX_M",
    "Fp8GemmConfig",
    "Fp8GemvConfig",
    "fp8_gemm",
    "select_fp8_gemm_tiles",
    "fp8_gemv",
    "fp8_kernels_supported",
    "quantize_per_token_triton",
    "scaled_mm_linear",
    "select_fp8_gemv",
]

MAX_M = 16  # rows of x one GEMV launch handles (the tl.dot minimum)

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


# ---- quantization inside kernels ----------------------------------------------------------------


@triton.jit
def row_scale(amax):
    """A row's scale from its absolute maximum, max(amax, 1e-12) / 448 rounded once (`scale_for`)."""
    return tl.math.div_rn(tl.maximum(amax, _MIN_AMAX), _FP8_MAX)


@triton.jit
def quantize_e4m3(x, scale, inv_scale, EMULATE: tl.constexpr):
    """fp32 x / scale saturated to +-448 and rounded to E4M3 (nearest even), as the reference does.

    The quotient is the correctly rounded x / scale, which `/` (an approximate division on the GPU)
    does not promise: q0 = x * RN(1/scale) is within an ulp of it, and one FMA step
    q0 + RN(x - q0 * scale) * RN(1/scale) rounds it correctly (Markstein's theorem, and no miss in
    8e7 random quotients against float64 division; three instructions against ~8 for a full-precision
    division per element). `inv_scale` is RN(1/scale).
    (A -0.0 in x comes out +0.0 where torch keeps the sign: the same value.)

    EMULATE (the interpreter): the interpreter's float -> E4M3 cast does not round to nearest even
    (-126.3 comes out -64, not -128: a mantissa carry into the exponent is lost), so it rounds here in
    fp32 and casts only values already on the E4M3 grid, which it converts exactly. Compiled kernels
    use the hardware cast (cvt.rn.satfinite on sm89+)."""
    q0 = x * inv_scale
    q = tl.fma(tl.fma(-q0, scale, x), inv_scale, q0)
    q = tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX)
    if EMULATE:
        bits = q.to(tl.int32, bitcast=True)
        # The binade's exponent; E4M3 subnormals (below 2^-6) share the spacing of the lowest binade.
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        # 2^(exponent + 20): an fp32 number whose ulp is this binade's E4M3 spacing 2^(exponent - 3),
        # so adding it rounds |q| to that spacing, nearest even, carries included.
        magic = ((exponent + 147) << 23).to(tl.float32, bitcast=True)
        rounded = (tl.abs(q) + magic) - magic
        q = tl.where(q < 0, -rounded, rounded)
    return q.to(tl.float8e4nv)


def fp8_kernels_supported(device: torch.device) -> bool:
    """Whether the Triton FP8 kernels run on `device`: compiled for sm89+ (Ada, Hopper: E4M3
    conversions in hardware), or under the CPU interpreter."""
    return interpreting() or supports_e4m3_cvt(device)


# ---- per-token quantization: one launch ---------------------------------------------------------


@triton.jit(do_not_specialize=["K"])
def _quantize_per_token_kernel(
    x_ptr,
    in_scale_ptr,
    xq_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = tl.load(in_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = row_scale(tl.max(amax, 0))
    inv_scale = tl.math.div_rn(1.0, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(xq_ptr + row * stride_qm + k0 + offs, quantize_e4m3(x, scale, inv_scale, EMULATE), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_per_token_triton(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_token` in one launch: x [M, K] -> (E4M3 [M, K], float32 scales [M, 1]), the same
    values. No host synchronisation; CUDA-graph safe."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    xq = torch.empty((m, k), dtype=E4M3, device=x.device)
    x_scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, x_scale
    block_k = min(next_pow2(k), 2048)
    _quantize_per_token_kernel[(m,)](
        x,
        input_scale if input_scale is not None else x_scale,
        xq,
        x_scale,
        k,
        x.stride(0),
        xq.stride(0),
        STATIC=input_scale is not None,
        BLOCK_K=block_k,
        EMULATE=interpreting(),
        num_warps=4 if block_k >= 1024 else 2,
    )
    return xq, x_scale


def scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FP8 product on the tensor cores (CUDA sm89+): x quantized per token in one launch, then
    torch._scaled_mm with row-wise scales (x_scale [M, 1], weight_scale [1, N]); K and N must be
    multiples of 16. weight [N, K] E4M3, contiguous (its transpose is the column-major operand)."""
    xq, x_scale = quantize_per_token_triton(x, input_scale)
    return torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=x_scale,
        scale_b=weight_scale.view(1, -1),
        bias=bias,
        out_dtype=x.dtype,
    )


# ---- GEMV and GEMM on the FP8 tensor cores ------------------------------------------------------


@dataclass(frozen=True)
class Fp8GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    # Programs per tile, each summing a slice of K: a 4096-row weight makes only 64 tiles of 64 rows.
    split_k: int = 1


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    split_k: int | None = None  # None: enough slices of K for the tiles to fill the GPU (`_split_for`)


CANDIDATES = (
    Fp8GemvConfig(64, 256, 4, 4),
    Fp8GemvConfig(64, 512, 4, 3),
    Fp8GemvConfig(128, 256, 4, 4),
    Fp8GemvConfig(64, 128, 4, 6),
    Fp8GemvConfig(64, 256, 4, 4, split_k=2),
    Fp8GemvConfig(64, 256, 4, 4, split_k=4),
)

# Rows of weight x rows of x per program by batch size (up to 256 rows; `fp8_gemm`'s default).
GEMM_CONFIGS = (
    (32, Fp8GemmConfig(32, 128, 128, 4, 4)),
    (64, Fp8GemmConfig(64, 128, 128, 4, 4)),
    (256, Fp8GemmConfig(128, 128, 128, 8, 3)),
)
GEMM_MAX_M = GEMM_CONFIGS[-1][0]
# The tiles `select_fp8_gemm_tiles` times per weight shape and batch size: narrower weight tiles
# and deeper K steps give a 4096-row weight more programs and fewer loop trips at 32-64 rows.
GEMM_CANDIDATES = (
    *(config for _, config in GEMM_CONFIGS),
    Fp8GemmConfig(32, 64, 256, 4, 4),
    Fp8GemmConfig(64, 64, 256, 4, 3),
    Fp8GemmConfig(64, 128, 256, 8, 3),
    Fp8GemmConfig(128, 64, 128, 4, 4),
    Fp8GemmConfig(64, 256, 128, 8, 3),
)

# The FP8 tensor cores of Hopper add their products at less than fp32 precision; each dot adds its
# partial sums into the fp32 accumulator at least every this many K (as CUTLASS and cuBLAS do).
PROMOTE_K = 128
# A pass over one row of x for its absolute maximum reads it this many elements at a time: each
# iteration is a round trip to cache, so the pass wants few of them.
X_BLOCK = 4096


# M changes with the batch: specialising on M == 1 would compile a second variant of every config.
@triton.jit(do_not_specialize=["M"])
def _fp8_matmul_kernel(
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    b_ptr,
    y_ptr,
    partial_ptr,
    arrivals_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    X_QUANTIZED: tl.constexpr,
    STATIC: tl.constexpr,
    ONE_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    X_BLOCK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PROMOTE: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """y^T [BLOCK_N, BLOCK_M] tiles = W [BLOCK_N, K] @ xq^T: the weight is the MMA's 64+-row operand
    and the few rows of x its narrow one, so a decode batch pads x to 16 rows, not the weight.

    X_QUANTIZED: x is E4M3 with its per-row scales at x_scale_ptr. Otherwise x is float and each
    program quantizes the rows it multiplies: per token (a first pass over K for the row's absolute
    maximum; x is small and read again from cache) or with the static scale at x_scale_ptr (STATIC).
    ONE_ROW (M == 1): one row is quantized and broadcast to the 16-row tile, not 16 rows of padding.
    SPLIT_K > 1: program_id(2) sums one slice of K (whole BLOCK_K tiles) into fp32 scratch; the last of
    a tile's programs to finish adds the slices in a fixed order and runs the epilogue."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k_begin + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + k_begin + offs_k[None, :]
    if X_QUANTIZED:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=m_mask, other=1.0)
    elif ONE_ROW:
        if STATIC:
            row_x_scale = tl.load(x_scale_ptr).to(tl.float32)
        else:
            offs_x = tl.arange(0, X_BLOCK)
            amax = tl.zeros((X_BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, X_BLOCK):
                x = tl.load(x_ptr + k0 + offs_x, mask=k0 + offs_x < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            row_x_scale = row_scale(tl.max(amax, 0))
        row_inv_scale = tl.math.div_rn(1.0, row_x_scale)
        x_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + row_x_scale
    else:
        if STATIC:
            x_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(x_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):  # over all of K (x_ptrs start at this program's slice)
                x = tl.load(
                    x_ptrs - k_begin + k0, mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0.0
                )
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            x_scale = row_scale(tl.max(amax, 1))
        inv_scale = tl.math.div_rn(1.0, x_scale)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_mask = (k0 + offs_k) < k_end
        if X_QUANTIZED:
            xq = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        elif ONE_ROW:
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            xq = quantize_e4m3(x, row_x_scale, row_inv_scale, EMULATE)
            xq = tl.broadcast_to(xq[None, :], (BLOCK_M, BLOCK_K))  # every column of y^T is row 0's
        else:
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            xq = quantize_e4m3(x, x_scale[:, None], inv_scale[:, None], EMULATE)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(xq), acc, max_num_imprecise_acc=PROMOTE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SPLIT_K > 1:  # the tile's last program to arrive adds the slices and alone stores
        acc, n_mask = reduce_tile_slices(
            partial_ptr, arrivals_ptr, acc, offs_m, offs_n, m_mask, n_mask, M, N, SPLIT_K
        )
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * x_scale[None, :] * w_scale[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


def _launch_matmul(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    tile: tuple[int, int, int, int, int],
    *,
    x_quantized: bool,
    static: bool,
    split_k: int = 1,
    max_rows: int,
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if weight.dtype != E4M3 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(
            f"weight must be a row-major E4M3 [N, {k}] tensor; got {weight.dtype} {weight.shape}"
        )
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    block_m, block_n, block_k, num_warps, num_stages = tile
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    # Scratch for the largest batch this kernel takes, so a graph's capture never grows it.
    rows = max(m, max_rows)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(rows, block_m)
    partial, arrivals = split_k_buffers(y, split_k, split_k * rows * n, tiles)
    _fp8_matmul_kernel[grid](
        x,
        x_scale,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        y,
        partial,
        arrivals,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        X_QUANTIZED=x_quantized,
        STATIC=static,
        ONE_ROW=m == 1 and not x_quantized,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        X_BLOCK=min(next_pow2(k), X_BLOCK),
        SPLIT_K=split_k,
        PROMOTE=min(PROMOTE_K, block_k),
        EMULATE=interpreting(),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    *,
    config: Fp8GemvConfig = CANDIDATES[0],
) -> torch.Tensor:
    """`fp8_linear_reference` for x [M, K] with M <= MAX_M in one launch, x quantized inside the
    kernel: weight [N, K] E4M3 (row major), weight_scale [N] float32, bias [N], input_scale a float32
    scalar (None: per token). No host synchronisation; CUDA-graph safe."""
    if x.shape[0] > MAX_M:
        raise ValueError(f"fp8_gemv takes up to {MAX_M} rows; got {x.shape[0]}")
    c = config
    return _launch_matmul(
        x,
        input_scale if input_scale is not None else weight_scale,
        weight,
        weight_scale,
        bias,
        x.dtype,
        (MAX_M, c.block_n, c.block_k, c.num_warps, c.num_stages),
        x_quantized=False,
        static=input_scale is not None,
        split_k=c.split_k,
        max_rows=MAX_M,
    )


GemmTiles = tuple[tuple[int, Fp8GemmConfig], ...]  # (up to this many rows, tile), by rows


def gemm_config(m: int, tiles: GemmTiles = GEMM_CONFIGS) -> Fp8GemmConfig:
    """The tile for an M-row batch (the first of `tiles` whose rows cover it)."""
    return next((config for rows, config in tiles if m <= rows), tiles[-1][1])


def fp8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    *,
    config: Fp8GemmConfig | None = None,
    tiles: GemmTiles = GEMM_CONFIGS,
) -> torch.Tensor:
    """`fp8_linear_reference` for mid-size batches (tens to hundreds of rows) in two launches: x
    quantized once (`quantize_per_token_triton`), then the product on the FP8 tensor cores with the
    row scales applied after the sum. The same arguments as `fp8_gemv`; config None: the tile of
    `tiles` for this many rows (`gemm_config`)."""
    xq, x_scale = quantize_per_token_triton(x, input_scale)
    c = config or gemm_config(x.shape[0], tiles)
    split_k = c.split_k or _split_for(x, weight, c)
    return _launch_matmul(
        xq,
        x_scale,
        weight,
        weight_scale,
        bias,
        x.dtype,
        (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages),
        x_quantized=True,
        static=False,
        split_k=split_k,
        max_rows=GEMM_MAX_M,
    )


def _split_for(x: torch.Tensor, weight: torch.Tensor, config: Fp8GemmConfig) -> int:
    """Slices of K (1 to 4, each of 2+ tiles) so that the tiles x slices fill the GPU's SMs once: a
    4096-row weight in 128-row tiles is 32 programs at 64 rows of x, a quarter of an H100."""
    if x.device.type != "cuda":
        return 1
    tiles = triton.cdiv(weight.shape[0], config.block_n) * triton.cdiv(x.shape[0], config.block_m)
    k_tiles = triton.cdiv(weight.shape[1], config.block_k)
    return max(1, min(4, triton.cdiv(num_sms(x.device), tiles), k_tiles // 2))


def select_fp8_gemm_tiles(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    rows: tuple[int, ...],
    *,
    activation_dtype: torch.dtype = torch.bfloat16,
) -> tuple[GemmTiles, dict]:
    """The fastest of GEMM_CANDIDATES at each of `rows` (ascending) for this weight on this GPU, timed as
    `select_fp8_gemv` times (in a CUDA graph, weights read from HBM), and the times (ms) by rows."""
    return fastest_by_rows(
        GEMM_CANDIDATES,
        rows,
        (weight.shape[1], activation_dtype, weight.device),
        lambda c, x, w: fp8_gemm(x, w, weight_scale, bias, input_scale, config=c),
        cold_copies(weight),
    )


def select_fp8_gemv(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
    *,
    activation_dtype: torch.dtype = torch.bfloat16,
) -> tuple[Fp8GemvConfig, dict[int, tuple[float, float]]]:
    """The fastest candidate at M=1 on this GPU, and its time against `scaled_mm_linear`'s at each of
    SELECTION_ROWS: {rows: (GEMV ms, scaled_mm ms)}; the caller takes the GEMV where it wins.

    Timed as `select_gemv` times the bf16 GEMV: inside a CUDA graph (as a decode step runs it), with
    weight copies totalling >= 256 MiB cycled so each launch reads its weight from HBM."""
    weights = cold_copies(weight)
    xs = {
        m: torch.randn(m, weight.shape[1], dtype=activation_dtype, device=weight.device)
        for m in SELECTION_ROWS
    }
    product = dict(bias=bias, input_scale=input_scale)
    best, gemv_m1 = fastest_in_graph(
        CANDIDATES, lambda c, w: fp8_gemv(xs[1], w, weight_scale, **product, config=c), weights
    )
    timings = {}
    for m, x in xs.items():
        gemv_ms = (
            gemv_m1
            if m == 1
            else time_in_graph_ms(
                lambda w, x=x: fp8_gemv(x, w, weight_scale, **product, config=best), weights
            )
        )
        scaled_mm_ms = time_in_graph_ms(
            lambda w, x=x: scaled_mm_linear(x, w, weight_scale, **product), weights
        )
        timings[m] = (gemv_ms, scaled_mm_ms)
    return best, timings
