"""GGUF tensors to fp32 in PyTorch: bit-identical to `gguf.quants.dequantize` (the same fp32 products
and sums, in the same order) for the formats below, and several times faster than its numpy, which
allocates a fresh full-size array for every intermediate. Here a tensor is converted in slices of
`_CHUNK_BLOCKS` blocks straight into its output, so the intermediates stay small and in cache, on one
thread: the slices are too small to split, and on a busy CPU every parallel region waits for its
slowest thread (0.5 s for the bundled model on one thread of a shared 2-core CPU, 1.5 to 7 s on two).
Other formats go through gguf's own code."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tensorjet.models.threads import one_thread

# ggml type ids (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_BLOCK = 32  # values per block of the 32-wide formats
_CHUNK_BLOCKS = 1 << 14  # 512k values: 2 MB of fp32 per slice


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """`raw`: the tensor's bytes as stored, [rows, bytes per row] uint8; returns fp32 of `shape`."""
    if ggml_type in _VALUES:
        return _VALUES[ggml_type](torch.from_numpy(raw.reshape(-1).copy())).reshape(shape)
    if ggml_type not in _BLOCKS:
        from gguf.quants import dequantize as gguf_dequantize

        values = np.asarray(gguf_dequantize(raw, ggml_type), dtype=np.float32)
        return torch.from_numpy(values.reshape(shape).copy())
    block_bytes, convert = _BLOCKS[ggml_type]
    blocks = raw.reshape(-1, block_bytes)
    out = torch.empty(blocks.shape[0], _BLOCK)
    with one_thread():
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            end = start + _CHUNK_BLOCKS
            # copied: the mapping is read-only, and torch wants tensors it may write
            convert(torch.from_numpy(blocks[start:end].copy()), out[start:end])
    return out.reshape(shape)


def _nibbles(quants: torch.Tensor) -> torch.Tensor:
    """[blocks, 16] bytes -> [blocks, 32] values: every low nibble, then every high nibble."""
    return torch.cat([quants & 0x0F, quants >> 4], dim=1)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as a [blocks, 1] fp32 column."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:  # d * (q - 8)
    out.copy_(_nibbles(blocks[:, 2:]).to(torch.int8) - 8).mul_(_half(blocks, 0))


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:  # d * q + m
    out.copy_(_nibbles(blocks[:, 4:])).mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:  # q * d
    out.copy_(blocks[:, 2:].contiguous().view(torch.int8)).mul_(_half(blocks, 0))


_VALUES: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    F32: lambda data: data.view(torch.float32),
    F16: lambda data: data.view(torch.float16).float(),
    BF16: lambda data: data.view(torch.bfloat16).float(),
}
_BLOCKS: dict[int, tuple[int, Callable[[torch.Tensor, torch.Tensor], None]]] = {
    Q4_0: (2 + _BLOCK // 2, _q4_0),
    Q4_1: (4 + _BLOCK // 2, _q4_1),
    Q8_0: (2 + _BLOCK, _q8_0),
}
