"""INT4 weight-only (W4A16) linear products: y[M, N] = x[M, K] @ W[N, K]^T, W stored as 4-bit codes.

The weight (`Int4Weight`, tensorjet's layout from `tensorjet.quant.int4_packing`): `qweight` int32
[N, ceil(K / 8)] with the code of column k at bits 4 (k % 8) of word k // 8; `scales` [N, groups] in
the activation dtype and `zeros` uint8 [N, groups] (None: every zero point is 8, a symmetric format),
one each per `group_size` columns; `perm` int32 [K] or None: stored column j multiplies input column
perm[j] (GPTQ's act order, its groups made contiguous at load).

Numerics of the reference (`tensorjet.kernels.int4_reference`, the CPU path): w = (code - zero) *
scale in fp32, rounded to x's dtype, then x @ w^T with fp32 accumulation. The kernels:
- `int4_matmul`: each [BLOCK_N, BLOCK_K] weight tile is multiplied on the tensor cores as eight
  [BLOCK_N, BLOCK_K / 8] slices, slice J holding nibble J of every word against the x columns 8i + J
  (no codes move between threads), W as the MMA's 64+-row operand and x its narrow one. A nibble
  becomes an exact float by ORing it into the mantissa of 2^23 (two integer instructions and an add).
  With 16-row x tiles and split-K (a 4096-row weight makes only 32-64 row blocks: SPLIT_K programs per
  block each sum a slice of K, the last to arrive adds the slices in order) it is the decode GEMV,
  whose tiles lie in one group: it multiplies the exact code - zero values and applies the group's
  scale to their fp32 sum (`scale_after`: one multiply per output instead of per weight; in bf16 it
  differs from the reference by the reference's rounding of w, under 2^-8 relative per weight). With
  larger tiles it is the GEMM of batches past 16 rows, in the reference's numerics (or scaling after
  the sum, where a tile chosen for it lies in one group), K split over programs up to 256 rows; or,
  in one group, "spread" (`unpack="spread"`): x the MMA's first operand and the weight tile its second,
  each word's codes turned into 128 + code inside the thread that loaded it, two per LOP3, so the tile
  reaches shared memory in 16-byte rows (the other tiles store it a value at a time); two packed FMAs
  more per pair turn the values into (code - zero) x scale in the 16-bit dtype (the reference's
  rounding) and every tile's product adds to one accumulator: no per-tile work on the sum (on an H100
  the fastest tiles at 32-256 rows);
- `dequantized_linear`: the whole weight dequantized by one launch (`int4_dequantize`, whole tiles
  stored in whole rows), then cuBLAS: for large prefill batches, where the GEMM's dequantization cost
  per row vanishes.
`select_int4_gemv`, `select_int4_gemm_tiles` and `select_int4_gemm` time the tiles on the GPU at
start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tensorjet.kernels._common import dot_precision, dot_upcast, interpreting, num_sms, tl_dot
from tensorjet.kernels.gemv import cold_copies, fastest_by_rows, fastest_in_graph, time_in_graph_ms
from tensorjet.kernels.int4_reference import Int4Weight
from tensorjet.kernels.split_k import reduce_slices, reduce_tile_slices, split_k_buffers

__all__ = [
    "GEMV_CANDIDATES",
    "GEMM_CANDIDATES",
    "GEMM_TILES",
    "GEMV_MAX_M",
    "GemmTiles",
    "Int4MatmulConfig",
    "cold_weights",
    "dequantized_linear",
    "int4_dequantize",
    "int4_gemm",
    "int4_gemv",
    "int4_matmul",
    "select_int4_gemm",
    "select_int4_gemm_tiles",
    "select_int4_gemv",
]

CODES_PER_WORD = 8
UNPACKINGS = ("slices", "spread")  # the kernel's UNPACK constexpr is an index into it
GEMV_MAX_M = 16  # rows of x one GEMV launch handles (the tl.dot minimum)


# ---- the Triton product ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs per output tile, each summing a slice of K
    # Slices within one group: multiply exact code - zero values and scale the group's fp32 sum (one
    # multiply per output instead of per weight; decode), else the reference's numerics.
    scale_after: bool = False
    # How a [BLOCK_N, BLOCK_K] weight tile reaches the tensor cores (UNPACKINGS): "slices", eight
    # [BLOCK_N, BLOCK_K / 8] slices of one nibble each and eight dots; "spread", the dequantized tile
    # in column order as the MMA's second operand (x its first), each word's nibbles spread within one
    # thread (`spread_words`), one dot (tiles in one group).
    unpack: str = "slices"

    def __post_init__(self) -> None:
        if self.unpack not in UNPACKINGS:
            raise ValueError(f"unpack must be one of {UNPACKINGS}; got {self.unpack!r}")
        if self.unpack == "spread" and self.scale_after:
            # Timed on an H100 (8B shapes, 32-256 rows), scaling the bare codes' sum per tile took
            # 1.2-1.4x the time of dequantizing the tile first, at every size.
            raise ValueError("spread tiles hold dequantized weights: scale_after applies to slices only")

    def fits(self, weight: Int4Weight) -> bool:
        """Whether this tile can multiply `weight`: a spread tile must lie in one group."""
        return self.unpack != "spread" or weight.group_size % self.block_k == 0


# sm_90 main loops (tests/sm90_codegen.py's compile, bf16, group 128): 9.6 instructions per weight at
# 64 rows and 4 warps, 8.6 at 128 rows and 8 warps (two warpgroups share the staged x columns; at 4
# warps Triton stages the dequantized tile through shared memory instead, one store per value).
GEMV_CANDIDATES = (
    Int4MatmulConfig(16, 64, 128, 4, 4, scale_after=True),
    Int4MatmulConfig(16, 128, 128, 8, 4, scale_after=True),
    Int4MatmulConfig(16, 64, 128, 4, 4, split_k=2, scale_after=True),
    Int4MatmulConfig(16, 128, 128, 8, 4, split_k=2, scale_after=True),
    Int4MatmulConfig(16, 64, 128, 4, 4, split_k=4, scale_after=True),
    Int4MatmulConfig(16, 128, 128, 8, 4, split_k=4, scale_after=True),
    # 32 rows on 2 warps: under a warpgroup's 64 rows the dots compile to mma.sync (HMMA), with no
    # wgmma fence and wait between the slices' products.
    Int4MatmulConfig(16, 32, 128, 2, 4, scale_after=True),
    Int4MatmulConfig(16, 32, 128, 2, 4, split_k=2, scale_after=True),
    Int4MatmulConfig(16, 32, 128, 2, 4, split_k=4, scale_after=True),
)
GemmTiles = tuple[tuple[int, Int4MatmulConfig], ...]  # (up to this many rows, tile), by rows
# Tiles by batch size (rows of x up to the first value) for the GEMM, untimed (the CPU interpreter).
# (A 256-row weight tile at 128 rows of x spills registers on sm_90.)
GEMM_TILES: GemmTiles = (
    (32, Int4MatmulConfig(32, 128, 128, 4, 3)),
    (64, Int4MatmulConfig(64, 128, 128, 4, 3)),
    (1 << 30, Int4MatmulConfig(128, 128, 128, 8, 3)),
)
# The tiles `select_int4_gemm_tiles` times per weight shape and batch size on a GPU: narrower weight
# tiles give a 4096-row weight more programs at tens of rows of x.
GEMM_CANDIDATES = (
    *(config for _, config in GEMM_TILES),
    Int4MatmulConfig(32, 64, 128, 4, 4),
    Int4MatmulConfig(64, 64, 128, 4, 4),
    Int4MatmulConfig(64, 128, 128, 8, 3),
    # Spread tiles: x the first operand, the weight tile dequantized in the 16-bit dtype and stored
    # once per step as the second in 16-byte rows (no per-value shared-memory stores), summed in one
    # accumulator; under a warpgroup's 64 rows of x, mma.sync.
    Int4MatmulConfig(16, 128, 128, 4, 4, unpack="spread"),
    Int4MatmulConfig(32, 128, 128, 4, 4, unpack="spread"),
    Int4MatmulConfig(64, 64, 128, 4, 4, unpack="spread"),
    Int4MatmulConfig(64, 128, 128, 4, 3, unpack="spread"),
    Int4MatmulConfig(64, 128, 128, 8, 3, unpack="spread"),
    # Each row tile of x unpacks the whole weight again: 128-row tiles halve that from 128 rows (on an
    # H100 at 128-512 rows, 0-16% less time than the best 64-row tile, by projection and size).
    Int4MatmulConfig(128, 64, 128, 4, 4, unpack="spread"),
    Int4MatmulConfig(128, 128, 128, 8, 4, unpack="spread"),
)
# The GEMM splits K (to fill the GPU's SMs) only up to this many rows of x: its scratch is sized for
# them once, before any CUDA graph is captured.
GEMM_SPLIT_MAX_M = 256
# At most this many slices: a program's loop over K is a chain of dependent steps, so the narrow
# products at tens of rows run fastest with as many programs as the SMs hold (an H100 timing:
# 6-8 slices of spread tiles 256 weight rows wide, 20-40% faster than 4).
GEMM_MAX_SPLIT_K = 8


@triton.jit
def load_words(
    qw_ptr, offs_n, n_mask, k0, k_end, stride_qn, BLOCK_K: tl.constexpr, WHOLE_TILES: tl.constexpr
):
    """The codes of W[offs_n, k0:k0+BLOCK_K] as int32 words [BLOCK_N, BLOCK_K // 8] (word i: columns
    k0 + 8i .. k0 + 8i + 7; none at or past k_end) and their mask. WHOLE_TILES: k_end is a multiple of
    BLOCK_K, so only rows are masked (a mask constant along a row lets loads be vectorized)."""
    offs_word = tl.arange(0, BLOCK_K // 8)
    if WHOLE_TILES:
        word_mask = n_mask[:, None] & (offs_word < BLOCK_K // 8)[None, :]
    else:
        word_mask = n_mask[:, None] & (k0 + offs_word * 8 < k_end)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    return tl.load(
        qw_ptr + rows * stride_qn + (k0 // 8 + offs_word)[None, :], mask=word_mask, other=0
    ), word_mask


@triton.jit
def load_codes(
    qw_ptr,
    scale_ptr,
    zero_ptr,
    offs_n,
    n_mask,
    k0,
    k_end,
    stride_qn,
    stride_sn,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`load_words`' words with their fp32 scales and `2^23 + zero point` (`nibble`'s offset): per row
    [BLOCK_N, 1] where the tile lies in one group (GROUP % BLOCK_K == 0), else per word
    [BLOCK_N, BLOCK_K // 8] (a group is whole words)."""
    words, word_mask = load_words(qw_ptr, offs_n, n_mask, k0, k_end, stride_qn, BLOCK_K, False)
    rows = offs_n[:, None].to(tl.int64)
    if GROUP % BLOCK_K == 0:
        group_ptrs = rows * stride_sn + k0 // GROUP
        group_mask = n_mask[:, None]
    else:
        offs_word = tl.arange(0, BLOCK_K // 8)
        group_ptrs = rows * stride_sn + ((k0 // 8 + offs_word) // (GROUP // 8))[None, :]
        group_mask = word_mask
    scale = tl.load(scale_ptr + group_ptrs, mask=group_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        offset = tl.load(zero_ptr + group_ptrs, mask=group_mask, other=0).to(tl.float32) + 8388608.0
    else:
        offset = tl.zeros_like(scale) + (8388608.0 + 8.0)
    return words, scale, offset


@triton.jit
def group_terms(
    scale_ptr, zero_ptr, offs_n, n_mask, k, stride_sn, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr
):
    """The scale and zero point (8 without zero points) in fp32 [BLOCK_N] of the group holding column k
    of W's rows offs_n."""
    ptrs = offs_n.to(tl.int64) * stride_sn + k // GROUP
    scale = tl.load(scale_ptr + ptrs, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zero_ptr + ptrs, mask=n_mask, other=0).to(tl.float32)
    else:
        zero = tl.zeros_like(scale) + 8.0
    return scale, zero


@triton.jit
def nibble(words, offset, J: tl.constexpr):
    """code - zero of nibble J of each word (columns 8i + J) in fp32, exactly: the code ORed into the
    mantissa of 2^23 is 2^23 + code, from which `offset` (2^23 + zero) is subtracted. Two integer
    instructions and an add, against a slower int -> float conversion."""
    codes = (words >> (4 * J)) & 0xF
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - offset


def packed_pairs(x: torch.Tensor, scale_after: bool) -> bool:
    """Whether the slices take `code_pairs`' two-nibbles-at-once path: compiled (its PTX does not run
    under the interpreter), with 16-bit activations, multiplying exact code - zero values."""
    return scale_after and x.is_cuda and not interpreting() and x.dtype in (torch.bfloat16, torch.float16)


@triton.jit
def negated_offset_pairs(offset, shape: tl.constexpr, dtype: tl.constexpr):
    """-(MAGIC + zero) in `dtype` twice in an int32 word, broadcast to `shape`: `code_pairs`' subtrahend,
    from `load_codes`' per-row offset (2^23 + zero; MAGIC is 128 in bf16, 1024 in fp16)."""
    magic = 128.0 if dtype == tl.bfloat16 else 1024.0
    return tl.broadcast_to(both_halves(-(offset - 8388608.0 + magic), dtype), shape)


@triton.jit
def both_halves(values, dtype: tl.constexpr):
    """`values` rounded to the 16-bit `dtype`, its bits in both halves of an int32 (a packed pair)."""
    bits = values.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def code_pairs(words, neg_pairs, scale_pairs, SCALED: tl.constexpr, J: tl.constexpr, dtype: tl.constexpr):
    """(nibble J, nibble J + 4) of each word (J < 4) as exact code - zero values in `dtype` (bf16 or
    fp16), both from one 32-bit pair: the two nibbles ANDed into the low mantissa bits of MAGIC twice
    (the last mantissa bit of 128.0 in bf16, of 1024.0 in fp16, is worth 1), then one packed FMA adds
    `neg_pairs` (`negated_offset_pairs`). A shift, a LOP3 and an FMA for two weights, against four
    instructions per weight through fp32 (`nibble`). SCALED: one more FMA multiplies by `scale_pairs` (a
    scale in both halves, as `both_halves` packs it): the dequantized weights, rounded once."""
    bf16: tl.constexpr = dtype == tl.bfloat16
    one: tl.constexpr = "0x3f803f80" if bf16 else "0x3c003c00"  # 1.0 twice
    magic: tl.constexpr = "0x43004300" if bf16 else "0x64006400"
    fma: tl.constexpr = "fma.rn.bf16x2" if bf16 else "fma.rn.f16x2"
    # t = (t x one) + $3, exact; then (t x $4) + -0.0, rounded once
    pair: tl.constexpr = "lop3.b32 t, $2, 0x000f000f, " + magic + ", 0xea; " + fma + " t, t, one, $3; "
    if not SCALED:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, one; mov.b32 one, " + one + "; " + pair + "mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r",
            [words >> (4 * J), neg_pairs],
            dtype=(tl.bfloat16, tl.bfloat16) if bf16 else (tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, one, nz; mov.b32 one, " + one + "; mov.b32 nz, 0x80008000; " + pair
        + fma + " t, t, $4, nz; mov.b32 {$0, $1}, t; }",
        "=h,=h,r,r,r",
        [words >> (4 * J), neg_pairs, scale_pairs],
        dtype=(tl.bfloat16, tl.bfloat16) if bf16 else (tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )  # fmt: skip


@triton.jit
def plain_pair(words, J: tl.constexpr, dtype: tl.constexpr):
    """(nibble J, nibble J + 4) of each word (J < 4) in `dtype`, each converted on its own (through
    fp32: the interpreter's int -> bf16 conversion is not exact)."""
    shifted = words >> (4 * J)
    return (shifted & 0xF).to(tl.float32).to(dtype), ((shifted >> 16) & 0xF).to(tl.float32).to(dtype)


@triton.jit
def spread_words(words, zero, scale, PAIRS: tl.constexpr, dtype: tl.constexpr):
    """`load_codes`' words [BLOCK_N, BLOCK_K / 8] as the dequantized [BLOCK_N, BLOCK_K] tile, (code -
    zero) x scale in `dtype` (`zero`, `scale`: fp32 [BLOCK_N], the tile's one group), in column order,
    built by joins so that each word's eight values stay in the thread that loaded it: the tile reaches
    shared memory in 16-byte rows, not one value per store. PAIRS (compiled, 16-bit dtype): two
    nibbles per LOP3 and two packed FMAs (`code_pairs`); else through fp32 (`plain_pair`)."""
    if PAIRS:
        neg_pairs = negated_offset_pairs(zero[:, None] + 8388608.0, words.shape, dtype)
        scale_pairs = tl.broadcast_to(both_halves(scale, dtype)[:, None], words.shape)
        lo0, hi0 = code_pairs(words, neg_pairs, scale_pairs, True, 0, dtype)
        lo1, hi1 = code_pairs(words, neg_pairs, scale_pairs, True, 1, dtype)
        lo2, hi2 = code_pairs(words, neg_pairs, scale_pairs, True, 2, dtype)
        lo3, hi3 = code_pairs(words, neg_pairs, scale_pairs, True, 3, dtype)
    else:
        lo0, hi0 = plain_pair(words, 0, dtype)
        lo1, hi1 = plain_pair(words, 1, dtype)
        lo2, hi2 = plain_pair(words, 2, dtype)
        lo3, hi3 = plain_pair(words, 3, dtype)
    # [..., a] = nibble j + 4a; then [..., a, b] = nibble j + 2b + 4a; then [..., a, b, c] = nibble
    # c + 2b + 4a, which the reshape lays out in order.
    even = tl.join(tl.join(lo0, hi0), tl.join(lo2, hi2))
    odd = tl.join(tl.join(lo1, hi1), tl.join(lo3, hi3))
    tile = tl.reshape(tl.join(even, odd), (words.shape[0], words.shape[1] * 8))
    if not PAIRS:  # the codes dequantized in fp32, rounded to `dtype` once
        tile = ((tile.to(tl.float32) - zero[:, None]) * scale[:, None]).to(dtype)
    return tile


@triton.jit
def spread_sum(
    x_ptr,
    qw_ptr,
    scale_ptr,
    zero_ptr,
    perm_ptr,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    k_begin,
    k_end,
    stride_xm,
    stride_qn,
    stride_sn,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WHOLE_TILES: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The "spread" product over K from k_begin to k_end, as y [BLOCK_M, BLOCK_N] in fp32: per tile
    (within one group) the dot of x with the dequantized tile, (code - zero) x scale in the 16-bit
    dtype as the reference rounds it, into one accumulator. WHOLE_TILES: K is a multiple of BLOCK_K,
    so no column is masked."""
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    scale, zero = group_terms(scale_ptr, zero_ptr, offs_n, n_mask, k_begin, stride_sn, GROUP, HAS_ZEROS)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = x_rows(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, k0, k_end, HAS_PERM, BLOCK_K, WHOLE_TILES)
        words, _ = load_words(qw_ptr, offs_n, n_mask, k0, k_end, stride_qn, BLOCK_K, WHOLE_TILES)
        # The next tile's group terms, loaded a step ahead: their latency hides behind this product.
        k_next = tl.minimum(k0 + BLOCK_K, k_end - 1)
        next_scale, next_zero = group_terms(
            scale_ptr, zero_ptr, offs_n, n_mask, k_next, stride_sn, GROUP, HAS_ZEROS
        )
        acc += tl_dot(x, tl.trans(spread_words(words, zero, scale, PAIRS, dtype)), DOT_PREC, UPCAST)
        scale, zero = next_scale, next_zero
    return acc


@triton.jit
def slice_pair(words, offset, scale, J: tl.constexpr, PAIRS: tl.constexpr, SCALED: tl.constexpr, dtype):
    """Slices J and J + 4 of `load_codes`' tile (nibbles J and J + 4 of every word, J < 4) as the dot's
    operands in `dtype`: both at once from `code_pairs` with PAIRS, else each through fp32 (`nibble`),
    times its scale where SCALED."""
    if PAIRS:
        return code_pairs(words, negated_offset_pairs(offset, words.shape, dtype), 0, False, J, dtype)
    else:
        lo = nibble(words, offset, J)
        hi = nibble(words, offset, J + 4)
        if SCALED:
            lo = lo * scale
            hi = hi * scale
        return lo.to(dtype), hi.to(dtype)


@triton.jit
def unpacked_tile(words, offset, scale, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of `load_codes`'s words in column order (column 8i + J is nibble J of
    word i), as (code - zero) x scale in fp32."""
    shifts = tl.arange(0, 8) * 4
    codes = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    w = (codes | 0x4B000000).to(tl.float32, bitcast=True) - offset[:, :, None]
    return tl.reshape(w * scale[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def x_at(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, cols, k_mask, HAS_PERM: tl.constexpr):
    """x[offs_m, cols] [BLOCK_M, len(cols)] (stored columns, through the act-order permutation where
    there is one); 0 where a row or column is masked."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols, mask=k_mask, other=0)
    return tl.load(
        x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
        mask=m_mask[:, None] & k_mask[None, :],
        other=0.0,
    )


@triton.jit
def x_columns(
    x_ptr,
    perm_ptr,
    offs_m,
    m_mask,
    stride_xm,
    k0,
    k_end,
    J: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x[offs_m, columns k0 + 8i + J] [BLOCK_M, BLOCK_K // 8]: the input columns nibble J of each word
    multiplies; 0 past k_end."""
    cols = k0 + tl.arange(0, BLOCK_K // 8) * 8 + J
    return x_at(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, cols, cols < k_end, HAS_PERM)


@triton.jit
def x_rows(
    x_ptr,
    perm_ptr,
    offs_m,
    m_mask,
    stride_xm,
    k0,
    k_end,
    HAS_PERM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WHOLE_TILES: tl.constexpr,
):
    """x[offs_m, columns k0 .. k0 + BLOCK_K - 1] [BLOCK_M, BLOCK_K] in whole rows; 0 past k_end.
    WHOLE_TILES: k_end is a multiple of BLOCK_K, so only rows are masked."""
    cols = k0 + tl.arange(0, BLOCK_K)
    return x_at(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, cols, (cols < k_end) | WHOLE_TILES, HAS_PERM)


# M changes with the batch: specialising on M == 1 would compile a second variant of every config.
@triton.jit(do_not_specialize=["M"])
def _int4_matmul_kernel(
    x_ptr,
    qw_ptr,
    scale_ptr,
    zero_ptr,
    perm_ptr,
    b_ptr,
    y_ptr,
    partial_ptr,
    arrivals_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_ym,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
    UNPACK: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    WHOLE_TILES: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y^T [BLOCK_N, BLOCK_M] tiles = W [BLOCK_N, K] @ x^T on the tensor cores. UNPACK (an index into
    UNPACKINGS) says how each weight tile reaches the dot: as eight [BLOCK_N, BLOCK_K / 8] slices,
    slice J holding nibble J of every word (no shuffling of codes between threads), against the x
    columns they multiply; or "spread" (`spread_sum`, y's tile [BLOCK_M, BLOCK_N], dequantized tiles).
    SCALE_AFTER (slices; the tile lies in one group): the dot takes exact code - zero values and the
    group's scale multiplies the fp32 sum; else each value is scaled and rounded to x's dtype first (the
    reference's numerics). PAIRS (compiled, 16-bit x; slices with SCALE_AFTER, or spread tiles): two
    nibbles at a time (`code_pairs`).
    SPLIT_K > 1: program_id(2) sums one slice of K (whole BLOCK_K tiles) into fp32 scratch; the last of
    a tile's programs to finish adds the slices in a fixed order and runs the epilogue. WHOLE_TILES:
    K is a multiple of BLOCK_K (the spread tiles then mask rows only)."""
    tl.static_assert(not SCALE_AFTER or GROUP % BLOCK_K == 0, "SCALE_AFTER needs tiles within one group")
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    dtype = x_ptr.dtype.element_ty
    if UNPACK == 1:  # spread: x the first operand, y's tile [BLOCK_M, BLOCK_N] (not transposed)
        tl.static_assert(GROUP % BLOCK_K == 0, "spread tiles must lie in one group")
        acc = spread_sum(
            x_ptr, qw_ptr, scale_ptr, zero_ptr, perm_ptr, offs_m, offs_n, m_mask, n_mask, k_begin, k_end,
            stride_xm, stride_qn, stride_sn, GROUP, HAS_ZEROS, HAS_PERM, PAIRS, BLOCK_M, BLOCK_N, BLOCK_K,
            WHOLE_TILES, DOT_PREC, UPCAST,
        )  # fmt: skip
        mn_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K > 1:
            acc, mn_mask = reduce_slices(
                partial_ptr,
                arrivals_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                acc,
                offs_m[:, None].to(tl.int64) * N + offs_n[None, :],
                mn_mask,
                M * N,
                SPLIT_K,
            )
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mn_mask)
        return
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        words, scale, offset = load_codes(
            qw_ptr, scale_ptr, zero_ptr, offs_n, n_mask, k0, k_end, stride_qn, stride_sn,
            GROUP, HAS_ZEROS, BLOCK_K,
        )  # fmt: skip
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(4):
            lo, hi = slice_pair(words, offset, scale, j, PAIRS, not SCALE_AFTER, dtype)
            x = x_columns(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, k0, k_end, j, HAS_PERM, BLOCK_K)
            part += tl_dot(lo, tl.trans(x), DOT_PREC, UPCAST)
            x = x_columns(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, k0, k_end, j + 4, HAS_PERM, BLOCK_K)
            part += tl_dot(hi, tl.trans(x), DOT_PREC, UPCAST)
        if SCALE_AFTER:
            part = part * scale
        acc += part
    if SPLIT_K > 1:  # the tile's last program to arrive adds the slices and alone stores
        acc, n_mask = reduce_tile_slices(
            partial_ptr, arrivals_ptr, acc, offs_m, offs_n, m_mask, n_mask, M, N, SPLIT_K
        )
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


def _check(x: torch.Tensor, weight: Int4Weight) -> None:
    n, k = weight.out_features, weight.in_features
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}]; got {tuple(x.shape)}")
    if weight.qweight.dtype != torch.int32 or weight.qweight.shape != (n, triton.cdiv(k, CODES_PER_WORD)):
        raise ValueError(f"qweight must be int32 [{n}, {triton.cdiv(k, 8)}]; got {weight.qweight.shape}")
    if weight.group_size % CODES_PER_WORD:
        raise ValueError(f"group_size must be a multiple of 8; got {weight.group_size}")


def int4_matmul(
    x: torch.Tensor,
    weight: Int4Weight,
    bias: torch.Tensor | None = None,
    *,
    config: Int4MatmulConfig,
    max_rows: int = GEMV_MAX_M,
) -> torch.Tensor:
    """`int4_linear_reference` in one launch with `config`'s tiles. `max_rows`: the largest batch this
    config serves, for which split-K scratch is sized (a CUDA graph's capture never grows it). No host
    synchronisation; CUDA-graph safe."""
    _check(x, weight)
    m = x.shape[0]
    n = weight.out_features
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    c = config
    if not c.fits(weight):
        raise ValueError(
            f"a {c.unpack!r} tile of {c.block_k} columns needs groups of whole tiles; "
            f"got group_size {weight.group_size}"
        )
    scale_after = c.scale_after and weight.group_size % c.block_k == 0
    grid = (triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m), c.split_k)
    # Scratch for the largest batch this kernel takes, so a graph's capture never grows it.
    rows = max(m, max_rows)
    tiles = triton.cdiv(n, c.block_n) * triton.cdiv(rows, c.block_m)
    partial, arrivals = split_k_buffers(y, c.split_k, c.split_k * rows * n, tiles)
    scales = weight.scales
    _int4_matmul_kernel[grid](
        x,
        weight.qweight,
        scales,
        weight.zeros if weight.zeros is not None else scales,
        weight.perm if weight.perm is not None else scales,
        bias if bias is not None else scales,
        y,
        partial,
        arrivals,
        m,
        n,
        weight.in_features,
        x.stride(0),
        weight.qweight.stride(0),
        scales.stride(0),
        y.stride(0),
        GROUP=weight.group_size,
        HAS_ZEROS=weight.zeros is not None,
        HAS_PERM=weight.perm is not None,
        HAS_BIAS=bias is not None,
        SCALE_AFTER=scale_after,
        UNPACK=UNPACKINGS.index(c.unpack),
        PAIRS=packed_pairs(x, scale_after or c.unpack == "spread"),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        SPLIT_K=c.split_k,
        WHOLE_TILES=weight.in_features % c.block_k == 0,
        DOT_PREC=dot_precision(x.dtype),
        UPCAST=dot_upcast(x.dtype),
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return y


def int4_gemv(
    x: torch.Tensor,
    weight: Int4Weight,
    bias: torch.Tensor | None = None,
    *,
    config: Int4MatmulConfig = GEMV_CANDIDATES[0],
) -> torch.Tensor:
    """The decode product, x of up to GEMV_MAX_M rows, with one of GEMV_CANDIDATES."""
    if x.shape[0] > GEMV_MAX_M:
        raise ValueError(f"int4_gemv takes up to {GEMV_MAX_M} rows; got {x.shape[0]}")
    return int4_matmul(x, weight, bias, config=config, max_rows=GEMV_MAX_M)


def gemm_config(m: int, tiles: GemmTiles = GEMM_TILES) -> Int4MatmulConfig:
    """The tile for an M-row batch (the first of `tiles` whose rows cover it)."""
    return next((config for rows, config in tiles if m <= rows), tiles[-1][1])


def int4_gemm(
    x: torch.Tensor,
    weight: Int4Weight,
    bias: torch.Tensor | None = None,
    *,
    config: Int4MatmulConfig | None = None,
    tiles: GemmTiles = GEMM_TILES,
) -> torch.Tensor:
    """The product for any number of rows; config None: the tile of `tiles` for this many rows. Up to
    GEMM_SPLIT_MAX_M rows on a GPU, K is split so that the tiles fill its SMs."""
    c = config or gemm_config(x.shape[0], tiles)
    split_k = _split_for(x, weight, c)
    if split_k > 1:
        return int4_matmul(x, weight, bias, config=replace(c, split_k=split_k), max_rows=GEMM_SPLIT_MAX_M)
    return int4_matmul(x, weight, bias, config=c, max_rows=0)


def _split_for(x: torch.Tensor, weight: Int4Weight, config: Int4MatmulConfig) -> int:
    """`even_split` for `config`'s tiles over x and `weight` on a GPU, up to GEMM_SPLIT_MAX_M rows."""
    if x.device.type != "cuda" or x.shape[0] > GEMM_SPLIT_MAX_M:
        return 1
    tiles = triton.cdiv(weight.out_features, config.block_n) * triton.cdiv(x.shape[0], config.block_m)
    return even_split(tiles, triton.cdiv(weight.in_features, config.block_k), num_sms(x.device))


def even_split(tiles: int, k_tiles: int, sms: int) -> int:
    """Slices of K (1 to GEMM_MAX_SPLIT_K, each of 2+ tiles) so that `tiles` x slices fill `sms` SMs
    once: a 4096-row weight in 128-row tiles is 32 programs at 64 rows of x, a quarter of an H100. The
    count is rounded up to one that splits K's tiles evenly where one does: a tile waits for its
    longest slice (at 64 rows on an H100, 3 slices of a 4096-column K took 9-16% longer than 4)."""
    most = max(1, min(GEMM_MAX_SPLIT_K, k_tiles // 2))
    fill = min(most, triton.cdiv(sms, tiles))
    return next((s for s in range(fill, most + 1) if k_tiles % s == 0), fill)


# ---- dequantize, then cuBLAS ----------------------------------------------------------------------


@triton.jit
def _dequantize_kernel(
    qw_ptr,
    scale_ptr,
    zero_ptr,
    perm_ptr,
    w_ptr,
    N,
    K,
    stride_qn,
    stride_sn,
    stride_wn,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W[offs_n, k0:k0+BLOCK_K], unpacked in column order so the dense tile is stored in whole rows."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    words, scale, offset = load_codes(
        qw_ptr, scale_ptr, zero_ptr, offs_n, n_mask, k0, K, stride_qn, stride_sn, GROUP, HAS_ZEROS, BLOCK_K
    )
    offset = tl.broadcast_to(offset, (BLOCK_N, BLOCK_K // 8))
    w = unpacked_tile(words, offset, tl.broadcast_to(scale, (BLOCK_N, BLOCK_K // 8)), BLOCK_N, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    k_mask = cols < K
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols, mask=k_mask, other=0)
    tl.store(
        w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :],
        w.to(w_ptr.dtype.element_ty),
        mask=n_mask[:, None] & k_mask[None, :],
    )


def int4_dequantize(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize(weight, dtype)` in one launch: W [N, K], columns in input order."""
    n, k = weight.out_features, weight.in_features
    w = torch.empty((n, k), dtype=dtype, device=weight.qweight.device)
    block_n, block_k = 32, 128
    scales = weight.scales
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        weight.qweight,
        scales,
        weight.zeros if weight.zeros is not None else scales,
        weight.perm if weight.perm is not None else scales,
        w,
        n,
        k,
        weight.qweight.stride(0),
        scales.stride(0),
        w.stride(0),
        GROUP=weight.group_size,
        HAS_ZEROS=weight.zeros is not None,
        HAS_PERM=weight.perm is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return w


def dequantized_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The weight dequantized whole (one launch), then `F.linear`: for prefill batches large enough
    that writing and reading back the dense weight costs less than dequantizing it per row tile."""
    _check(x, weight)
    return F.linear(x, int4_dequantize(weight, x.dtype), bias)


# ---- start-up timing ------------------------------------------------------------------------------


def cold_weights(weight: Int4Weight) -> list[Int4Weight]:
    """Copies of `weight` cycled in a timing loop so each launch reads its codes from HBM."""
    return [
        Int4Weight(q, weight.scales, weight.zeros, weight.perm, weight.group_size, weight.in_features)
        for q in cold_copies(weight.qweight)
    ]


def select_int4_gemv(
    weight: Int4Weight, bias: torch.Tensor | None, *, activation_dtype: torch.dtype = torch.bfloat16
) -> tuple[Int4MatmulConfig, dict]:
    """The fastest GEMV candidate at M=1 on this GPU, and timings (ms) of it at M=1 and M=16 and of
    the bf16 product it replaces (`F.linear` over the dequantized weight), in CUDA graphs with cold
    weights (as `tensorjet.kernels.gemv.select_gemv` times)."""
    weights = cold_weights(weight)
    device = weight.qweight.device
    xs = {
        m: torch.randn(m, weight.in_features, dtype=activation_dtype, device=device) for m in (1, GEMV_MAX_M)
    }
    timings: dict = {}
    best, timings["gemv_m1"] = fastest_in_graph(
        GEMV_CANDIDATES, lambda c, w: int4_gemv(xs[1], w, bias, config=c), weights
    )
    timings[f"gemv_m{GEMV_MAX_M}"] = time_in_graph_ms(
        lambda w: int4_gemv(xs[GEMV_MAX_M], w, bias, config=best), weights
    )
    dense = cold_copies(int4_dequantize(weight, activation_dtype))
    timings["bf16_m1"] = time_in_graph_ms(lambda w: F.linear(xs[1], w, bias), dense)
    return best, timings


def select_int4_gemm_tiles(
    weight: Int4Weight,
    bias: torch.Tensor | None,
    rows: tuple[int, ...],
    *,
    activation_dtype: torch.dtype = torch.bfloat16,
) -> tuple[GemmTiles, dict]:
    """The fastest of GEMM_CANDIDATES that fit this weight at each of `rows` (ascending) on this GPU, timed as
    `select_int4_gemv` times (in a CUDA graph, codes read from HBM), and the times (ms) by rows."""
    return fastest_by_rows(
        [config for config in GEMM_CANDIDATES if config.fits(weight)],
        rows,
        (weight.in_features, activation_dtype, weight.qweight.device),
        lambda c, x, w: int4_gemm(x, w, bias, config=c),
        cold_weights(weight),
    )


def select_int4_gemm(
    weight: Int4Weight,
    bias: torch.Tensor | None,
    *,
    tiles: GemmTiles = GEMM_TILES,
    activation_dtype: torch.dtype = torch.bfloat16,
    sizes: tuple[int, ...] = (1024, 2048, 4096),
) -> tuple[int | None, dict]:
    """The smallest batch size in `sizes` from which dequantizing the whole weight and running cuBLAS
    (`dequantized_linear`) times faster than the Triton GEMM with `tiles`; None where it never does.
    With timings. The sizes start past the largest step a CUDA graph captures (512 tokens), so the
    dense weight is only ever a transient of an eager prefill step (counted by the memory-profiling
    forward)."""
    device = weight.qweight.device
    timings: dict = {}
    for m in sizes:
        x = torch.randn(m, weight.in_features, dtype=activation_dtype, device=device)
        timings[f"gemm_m{m}"] = time_in_graph_ms(
            lambda w, x=x: int4_gemm(x, w, bias, tiles=tiles), [weight], launches=8
        )
        timings[f"dequant_m{m}"] = time_in_graph_ms(
            lambda w, x=x: dequantized_linear(x, w, bias), [weight], launches=8
        )
        if timings[f"dequant_m{m}"] < timings[f"gemm_m{m}"]:
            return m, timings
    return None, timings
