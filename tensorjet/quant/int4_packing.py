"""4-bit integer codes packed into int32 words: the checkpoint formats' layouts and tensorjet's own.

Codes are unsigned (0..15); a weight is (code - zero point) * scale, its group's scale and zero point.
Every format packs eight codes per int32 word, the i-th at bits 4i..4i+3, and differs in which axis it
packs along and in what order:
- tensorjet (the kernels' layout, also compressed-tensors' `weight_packed`): [N, ceil(K / 8)], along K
  in order; a K that is not a multiple of 8 is padded with code 0;
- compressed-tensors `weight_zero_point` (asymmetric): [ceil(N / 8), groups], along N in order; its
  codes are the signed values + 8, as are `weight_packed`'s;
- GPTQ: `qweight` [K / 8, N] along K in order, `qzeros` [groups, N / 8] along N in order; GPTQ's v1
  format (AutoGPTQ's, the common one) stores each zero point minus one;
- AutoAWQ GEMM: `qweight` [K, N / 8] and `qzeros` [groups, N / 8], along N with eight columns in the
  order AWQ_ORDER (word i's nibble j holds column 8i + AWQ_ORDER[j]).
Packing and unpacking are exact inverses; these functions are the one place each layout is written.
"""

from __future__ import annotations

import torch

CODES_PER_WORD = 8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int32(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Unsigned 4-bit codes (any integer dtype, 0..15) packed eight per int32 along `dim` (0 or 1) in
    order; the packed axis is padded with code 0 to a multiple of 8."""
    if codes.dim() != 2 or dim not in (0, 1):
        raise ValueError(f"pack_int32 takes a 2-D tensor and dim 0 or 1; got {tuple(codes.shape)}, {dim}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("4-bit codes must lie in 0..15")
    codes = codes.to(torch.int64)
    if dim == 0:
        return pack_int32(codes.T, 1).T.contiguous()
    rows, cols = codes.shape
    pad = -cols % CODES_PER_WORD
    codes = torch.nn.functional.pad(codes, (0, pad))
    words = (codes.view(rows, -1, CODES_PER_WORD) << _SHIFTS.to(codes.device, torch.int64)).sum(-1)
    return _as_int32(words)


def unpack_int32(words: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """The first `count` codes along `dim` of int32 words packed by `pack_int32`, as uint8."""
    if words.dtype != torch.int32 or words.dim() != 2 or dim not in (0, 1):
        raise ValueError(f"unpack_int32 takes 2-D int32 words; got {words.dtype} {tuple(words.shape)}")
    if dim == 0:
        return unpack_int32(words.T, 1, count).T.contiguous()
    if count > words.shape[1] * CODES_PER_WORD:
        raise ValueError(f"{words.shape[1]} words hold at most {words.shape[1] * CODES_PER_WORD} codes")
    codes = (words[:, :, None] >> _SHIFTS.to(words.device)) & 0xF
    return codes.reshape(words.shape[0], -1)[:, :count].to(torch.uint8)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in 0..2^32-1 as the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# ---- AutoAWQ GEMM ---------------------------------------------------------------------------------


def _awq_columns(n: int, device: torch.device) -> torch.Tensor:
    """Position j of the in-order unpacking holds column _awq_columns(n)[j]."""
    order = torch.tensor(AWQ_ORDER, device=device)
    return (torch.arange(0, n, CODES_PER_WORD, device=device)[:, None] + order).reshape(-1)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, N] (N a multiple of 8) as AutoAWQ GEMM words [rows, N / 8]."""
    if codes.shape[1] % CODES_PER_WORD:
        raise ValueError(f"AWQ packs along N in words of 8; N={codes.shape[1]}")
    return pack_int32(codes[:, _awq_columns(codes.shape[1], codes.device)], 1)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM words [rows, N / 8] as codes [rows, N] in column order (uint8)."""
    n = words.shape[1] * CODES_PER_WORD
    interleaved = unpack_int32(words, 1, n)
    codes = torch.empty_like(interleaved)
    codes[:, _awq_columns(n, words.device)] = interleaved
    return codes


# ---- GPTQ -----------------------------------------------------------------------------------------


def pack_gptq_weight(codes: torch.Tensor) -> torch.Tensor:
    """Weight codes [N, K] (K a multiple of 8) as GPTQ `qweight` [K / 8, N]."""
    if codes.shape[1] % CODES_PER_WORD:
        raise ValueError(f"GPTQ packs along K in words of 8; K={codes.shape[1]}")
    return pack_int32(codes.T, 0)


def unpack_gptq_weight(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ `qweight` [K / 8, N] as codes [N, K]."""
    return unpack_int32(qweight, 0, qweight.shape[0] * CODES_PER_WORD).T.contiguous()


def pack_gptq_zeros(zeros: torch.Tensor, v1: bool = True) -> torch.Tensor:
    """Zero points [N, groups] as GPTQ `qzeros` [groups, N / 8]; v1 stores each minus one (a zero point
    of 0 cannot be written in v1: AutoGPTQ's own packing corrupts its word)."""
    zeros = zeros.to(torch.int64) - (1 if v1 else 0)
    if v1 and bool((zeros < 0).any()):
        raise ValueError("GPTQ v1 cannot store a zero point of 0; write checkpoint_format gptq_v2")
    return pack_int32(zeros.T, 1)


def unpack_gptq_zeros(qzeros: torch.Tensor, n: int, v1: bool = True) -> torch.Tensor:
    """GPTQ `qzeros` [groups, N / 8] as zero points [N, groups] (uint8): v1 adds back the one it took
    off, so a stored 15 reads as 16, as AutoGPTQ's and exllama's kernels read it."""
    zeros = unpack_int32(qzeros, 1, n).T
    return (zeros + 1 if v1 else zeros).contiguous()


# ---- compressed-tensors pack-quantized ------------------------------------------------------------


def pack_compressed_tensors_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """Zero points [N, groups] as compressed-tensors `weight_zero_point` [ceil(N / 8), groups]."""
    return pack_int32(zeros, 0)


def unpack_compressed_tensors_zeros(words: torch.Tensor, n: int) -> torch.Tensor:
    """compressed-tensors `weight_zero_point` [ceil(N / 8), groups] as zero points [N, groups]."""
    return unpack_int32(words, 0, n)
