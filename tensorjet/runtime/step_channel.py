"""Rank 0 tells the other tensor-parallel ranks what to run, one step at a time.

A step crosses as two int64 tensors broadcast over a gloo group (so it works across nodes and never
touches the devices' streams): a fixed-size header of counts, then the values `ModelRunner.prepare` laid
out for its one host-to-device copy, preceded by the step's query lengths, sampled sequences, prompt
rows and the lengths of the values' parts. No Python objects are pickled per step. Every rank then
builds the same device inputs and runs the same forward, so their collectives meet. Before the first
step rank 0 says once that the KV caches are sized and started (the ranks do it together: a profiling
forward and the graphs' captures run collectives), and a server's rank 0 that they are made resident.

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
_STOP, _STEP, _START, _RESIDENT = 0, 1, 2, 3
# What `receive` returns when rank 0 made its KV cache resident (`ModelRunner.make_kv_cache_resident`).
MAKE_KV_CACHE_RESIDENT = "make_kv_cache_resident"
_HOST = torch.device("cpu")
_HEADER = 7  # kind, sequences, sampled sequences, prompt rows, value parts, values, block-table width


@dataclass
class StepMessage:
    """One step as the workers need it. `values`: the runner's flattened host values (`ModelRunner.prepare`),
    its part i `part_lengths[i]` long, each padded to an even length."""

    query_lens: list[int]
    sampled_seq_ids: list[int]
    prompt_rows: list[int]
    max_blocks: int
    part_lengths: list[int]
    values: torch.Tensor  # int64, on the host


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

    def send_step(
        self,
        query_lens: list[int],
        sampled_seq_ids: list[int],
        prompt_rows: list[int],
        max_blocks: int,
        part_lengths: list[int],
        values: list[int],
    ) -> None:
        counts = [len(query_lens), len(sampled_seq_ids), len(prompt_rows), len(part_lengths), len(values)]
        header = torch.tensor([_STEP, *counts, max_blocks], dtype=torch.long)
        payload = to_device(
            query_lens + sampled_seq_ids + prompt_rows + part_lengths + values, torch.long, _HOST
        )
        self._broadcast(header)
        self._broadcast(payload)

    def send_stop(self) -> None:
        self._broadcast(self._header(_STOP))

    def send_make_kv_cache_resident(self) -> None:
        self._broadcast(self._header(_RESIDENT))

    def receive(self) -> StepMessage | str | None:
        """The next step rank 0 sends, or MAKE_KV_CACHE_RESIDENT; None when it stops the engine."""
        header = torch.empty(_HEADER, dtype=torch.long)
        self._broadcast(header)
        kind, seqs, sampled, prompt, parts, values, max_blocks = header.tolist()
        if kind == _STOP:
            return None
        if kind == _RESIDENT:
            return MAKE_KV_CACHE_RESIDENT
        if kind != _STEP:
            raise RuntimeError(f"rank 0 sent message kind {kind} where a step was expected")
        payload = torch.empty(seqs + sampled + prompt + parts + values, dtype=torch.long)
        self._broadcast(payload)
        query_lens, sampled_ids, prompt_rows, lengths, values_t = payload.split(
            [seqs, sampled, prompt, parts, values]
        )
        return StepMessage(
            query_lens.tolist(),
            sampled_ids.tolist(),
            prompt_rows.tolist(),
            max_blocks,
            lengths.tolist(),
            values_t,
        )

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
