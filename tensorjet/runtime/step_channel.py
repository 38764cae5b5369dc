"""Rank 0 tells the other tensor-parallel ranks what to run, one step at a time.

A step crosses as two int64 tensors broadcast over a gloo group (so it works across nodes and never
touches the devices' streams): a fixed-size header of counts, then the step's values (`StepValues`: per
sequence its lengths and block table, per row its token, position and slot), the sequences that sample
and the prompt rows. No Python objects are pickled per step. Every rank then
builds the same device inputs and runs the same forward, so their collectives meet. Before the first
step rank 0 says once that the KV caches are sized and started (the ranks do it together: a profiling
forward and the graphs' captures run collectives), and a server's rank 0 that they are made resident.

The group's timeout is long on purpose: a worker waits here for the next step as long as the server
idles. A rank that dies closes its connections, and the others' waits fail at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from itertools import chain, islice

import torch
import torch.distributed as dist

from tensorjet.runtime.device_io import to_device
from tensorjet.runtime.step_values import StepValues

# Waiting for a step (an idle server) or for the other ranks to load their weights.
CONTROL_TIMEOUT = timedelta(days=30)
_STOP, _STEP, _START, _RESIDENT = 0, 1, 2, 3
# What `receive` returns when rank 0 made its KV cache resident (`ModelRunner.make_kv_cache_resident`).
MAKE_KV_CACHE_RESIDENT = "make_kv_cache_resident"
_HOST = torch.device("cpu")
_HEADER = 6  # kind, sequences, sampled sequences, prompt rows, block-table width, values


@dataclass
class StepMessage:
    """One step as the workers need it: its values and which sequences sample, with prompt rows."""

    values: StepValues
    sampled_seq_ids: list[int]
    prompt_rows: list[int]


class StepChannel:
    """Messages from rank 0 to every other rank, over `group` (gloo, every rank in it): once, that the KV
    caches are sized and started; then each step (and once, in a server, that the KV caches are made
    resident); at last, stop."""

    def __init__(self, group) -> None:
        self.group = group

    def send_start(self) -> None:
        self._broadcast(self._header(_START))

    def wait_for_start(self) -> bool:
        """Until rank 0 starts its KV cache (True) or stops the engine before it does (False)."""
        header = torch.empty(_HEADER, dtype=torch.long)
        self._broadcast(header)
        kind = int(header[0])
        if kind not in (_START, _STOP):
            raise RuntimeError(f"rank 0 sent message kind {kind} before starting the KV cache")
        return kind == _START

    def send_step(self, values: StepValues, sampled_seq_ids: list[int], prompt_rows: list[int]) -> None:
        parts = [getattr(values, name) for name in StepValues.MESSAGE_PARTS]
        tables = values.flat_block_tables()
        payload = list(
            chain(
                values.query_lens,
                values.context_lens,
                sampled_seq_ids,
                prompt_rows,
                map(len, parts),
                *parts,
                tables,
            )
        )
        width = len(tables) // values.num_seqs
        counts = [values.num_seqs, len(sampled_seq_ids), len(prompt_rows), width, len(payload)]
        self._broadcast(torch.tensor([_STEP, *counts], dtype=torch.long))
        self._broadcast(to_device(payload, torch.long, _HOST))

    def send_stop(self) -> None:
        self._broadcast(self._header(_STOP))

    def send_make_kv_cache_resident(self) -> None:
        self._broadcast(self._header(_RESIDENT))

    def receive(self) -> StepMessage | str | None:
        """The next step rank 0 sends, or MAKE_KV_CACHE_RESIDENT; None when it stops the engine."""
        header = torch.empty(_HEADER, dtype=torch.long)
        self._broadcast(header)
        kind, seqs, sampled, prompt, max_blocks, size = header.tolist()
        if kind == _STOP:
            return None
        if kind == _RESIDENT:
            return MAKE_KV_CACHE_RESIDENT
        if kind != _STEP:
            raise RuntimeError(f"rank 0 sent message kind {kind} where a step was expected")
        payload = torch.empty(size, dtype=torch.long)
        self._broadcast(payload)
        numbers = iter(payload.tolist())

        def take(n: int) -> list[int]:
            return list(islice(numbers, n))

        query_lens, context_lens = take(seqs), take(seqs)
        sampled_ids, prompt_rows = take(sampled), take(prompt)
        lengths = take(len(StepValues.MESSAGE_PARTS))
        parts = {name: take(n) for name, n in zip(StepValues.MESSAGE_PARTS, lengths)}
        tables = [take(max_blocks) for _ in range(seqs)]
        values = StepValues(query_lens=query_lens, context_lens=context_lens, block_tables=tables, **parts)
        return StepMessage(values, sampled_ids, prompt_rows)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` any rank has (the KV blocks every rank's memory holds)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    @staticmethod
    def _header(kind: int) -> torch.Tensor:
        return torch.tensor([kind] + [0] * (_HEADER - 1), dtype=torch.long)

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self.group)
