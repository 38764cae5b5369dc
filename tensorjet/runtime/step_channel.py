"""Rank 0 tells the other tensor-parallel ranks what to run, one step at a time.

A step crosses as two int64 tensors broadcast over a gloo group (so it works across nodes and never
touches the devices' streams): a fixed-size header of counts, then the values `ModelRunner.prepare` laid
out for its one host-to-device copy, preceded by the step's query lengths, sampled sequences and prompt
rows. No Python objects are pickled per step. Every rank then builds the same device inputs and runs
the same forward, so their collectives meet.

The group's timeout is long on purpose: a worker waits here for the next step as long as the server
idles. A rank that dies closes its connections, and the others' waits fail at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tensorjet.runtime.device_io import to_device

# Waiting for a step (an idle server) or for the other ranks to load their weights.
CONTROL_TIMEOUT = timedelta(days=30)
_STOP, _STEP = 0, 1
_HOST = torch.device("cpu")
_HEADER = 7  # kind, sequences, rows, sampled rows, prompt rows, pending tokens, block-table width


def part_lengths(rows: int, sampled: int, seqs: int, pending: int, max_blocks: int) -> list[int]:
    """The lengths of a step's value parts (see `StepMessage`), before padding."""
    return [rows, rows, rows, sampled, seqs, pending, pending, seqs * max_blocks]


@dataclass
class StepMessage:
    """One step as the workers need it. `values`: the runner's flattened host values, each part padded to
    an even length (`ModelRunner.prepare`): input ids, positions, slots, sampled rows, context lengths,
    pending rows, their rows in the previous step's samples, block tables."""

    query_lens: list[int]
    sampled_seq_ids: list[int]
    prompt_rows: list[int]
    num_pending: int
    max_blocks: int
    values: torch.Tensor  # int64, on the host

    @property
    def part_lengths(self) -> list[int]:
        return part_lengths(
            sum(self.query_lens),
            len(self.sampled_seq_ids),
            len(self.query_lens),
            self.num_pending,
            self.max_blocks,
        )


class StepChannel:
    """Step messages from rank 0 to every other rank, over `group` (gloo, every rank in it)."""

    def __init__(self, group) -> None:
        self.group = group

    def send_step(
        self,
        query_lens: list[int],
        sampled_seq_ids: list[int],
        prompt_rows: list[int],
        num_pending: int,
        max_blocks: int,
        values: list[int],
    ) -> None:
        counts = [len(query_lens), sum(query_lens), len(sampled_seq_ids), len(prompt_rows), num_pending]
        header = torch.tensor([_STEP, *counts, max_blocks], dtype=torch.long)
        payload = to_device(query_lens + sampled_seq_ids + prompt_rows + values, torch.long, _HOST)
        self._broadcast(header)
        self._broadcast(payload)

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([_STOP] + [0] * (_HEADER - 1), dtype=torch.long))

    def receive(self) -> StepMessage | None:
        """The next step rank 0 sends; None when it stops the engine."""
        header = torch.empty(_HEADER, dtype=torch.long)
        self._broadcast(header)
        kind, seqs, rows, sampled, prompt, pending, max_blocks = header.tolist()
        if kind == _STOP:
            return None
        values = sum(n + n % 2 for n in part_lengths(rows, sampled, seqs, pending, max_blocks))
        payload = torch.empty(seqs + sampled + prompt + values, dtype=torch.long)
        self._broadcast(payload)
        query_lens, sampled_ids, prompt_rows, values_t = payload.split([seqs, sampled, prompt, values])
        return StepMessage(
            query_lens.tolist(), sampled_ids.tolist(), prompt_rows.tolist(), pending, max_blocks, values_t
        )

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` any rank has (the KV blocks every rank's memory holds)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self.group)
