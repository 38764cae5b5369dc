"""Tensor parallelism as the layers see it: which rank this process is, how many share the model, how a
dimension is split over them, and the three collectives the sharded layers run.

A leaf: it imports only torch, so layers and the runtime alike may use it. The process group itself is
set up by the runtime (`tensorjet.runtime.parallel`); here `group` is only the one the collectives run on
(None: torch.distributed's default group). With one rank nothing here communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the ranks that share the model's weights."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup of the device collectives; None: the default one

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not one of {self.size} tensor-parallel ranks")

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that samples and receives the gathered logits."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place (each rank holds a partial sum)."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each rank's x [rows, n] side by side on rank 0, [rows, size * n]; None on the other ranks.
        It runs as an all-gather (the other ranks drop theirs): rank 0 receives the same bytes as from a
        gather, and NCCL's all-gather is a collective that CUDA graphs are known to capture."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1) if self.is_first else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x in every rank's x, in place."""
        dist.broadcast(x, src=0, group=self.group)
        return x


SINGLE = TensorParallel()  # one process holds the whole model


@dataclass(frozen=True)
class Slice:
    """A rank's part of one dimension of a weight: `size` entries from `start`, of which the first `valid`
    exist in the checkpoint (the rest, padding where the dimension does not divide, are zeros)."""

    start: int
    size: int
    valid: int

    @property
    def padded(self) -> bool:
        return self.valid < self.size


def split(
    total: int, tp: TensorParallel, what: str, unit: int = 1, replicate: bool = False, pad: bool = False
) -> Slice:
    """This rank's slice of a dimension of `total` entries, cut only between units of `unit` entries (a
    head's rows). The ranks must divide the units, with two exceptions: with `replicate`, fewer units than
    ranks (that divide the ranks) are each held by size / units ranks (key and value heads); with `pad`,
    each rank holds ceil(units / size) units, the last ones zero-padded (a vocabulary). Otherwise a
    ValueError names `what`."""
    if tp.size == 1:
        return Slice(0, total, total)
    if total % unit:
        raise ValueError(f"{what} ({total}) is not a whole number of units of {unit}")
    units = total // unit
    if units % tp.size == 0:
        per_rank = units // tp.size
        return Slice(tp.rank * per_rank * unit, per_rank * unit, per_rank * unit)
    if replicate and units < tp.size and tp.size % units == 0:
        index = tp.rank * units // tp.size
        return Slice(index * unit, unit, unit)
    if pad:
        per_rank = -(-units // tp.size)
        start = min(tp.rank * per_rank, units)
        valid = min(per_rank, units - start)
        return Slice(start * unit, per_rank * unit, valid * unit)
    rule = "divide" + (" or be a multiple of" if replicate else "")
    raise ValueError(f"option tensor_parallel_size={tp.size} must {rule} the {what} ({units})")
