"""Where a step's integer inputs sit in one byte buffer, so that one host-to-device copy moves them all.

A `Layout` places named parts (each a run of int64 or int32 values) one after another, each at a
16-byte-aligned offset: Triton compiles a kernel variant per pointer alignment, so a part at an odd
offset would compile another. A CUDA graph captures views of one fixed layout in its static buffer; an
eager step lays out exactly its own parts in a fresh buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 16
_NUMPY = {torch.long: np.int64, torch.int32: np.int32}


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    length: int
    dtype: torch.dtype = torch.long


class Layout:
    """Parts in order, each 16-byte aligned, from byte `start` of a buffer (another layout's `end`, for
    parts that follow its own) to byte `end`."""

    def __init__(self, parts: Iterable[Part], start: int = 0) -> None:
        self.parts: dict[str, tuple[int, Part]] = {}
        offset = start
        for part in parts:
            offset += -offset % _ALIGN
            self.parts[part.name] = (offset, part)
            offset += part.length * part.dtype.itemsize
        self.end = offset

    def view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        """Part `name` as a 1-D tensor of its dtype over `buffer` (uint8, at least `end` bytes)."""
        offset, part = self.parts[name]
        return buffer[offset : offset + part.length * part.dtype.itemsize].view(part.dtype)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.view(buffer, name) for name in self.parts}

    def write(self, buffer: np.ndarray, values: Mapping[str, Sequence[int]]) -> None:
        """Every part's values into `buffer` (uint8, host memory); each holds exactly its part's length."""
        for name, (offset, part) in self.parts.items():
            numbers = values[name]
            if len(numbers) != part.length:
                raise ValueError(f"part {name!r} holds {part.length} values, got {len(numbers)}")
            if part.length:
                end = offset + part.length * part.dtype.itemsize
                buffer[offset:end].view(_NUMPY[part.dtype])[:] = numbers
