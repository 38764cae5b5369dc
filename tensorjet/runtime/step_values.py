"""A step's numbers on the host, flattened over its sequences' query rows, before their one copy to the
device (`StepUpload`). Rank 0's runner builds them from a `StepBatch`; under tensor parallelism the other
ranks receive the same numbers (`StepChannel`) and lay them out the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tensorjet.layers.step_layout import Part


def _numbers() -> list[int]:
    return field(default_factory=list)


@dataclass(slots=True)
class StepValues:
    """Per sequence: its query rows, its context (cached prefix + new tokens) and its block table. Per
    query row: its token (a placeholder where the step in flight or a draft model supplies it), position
    and cache slot. The rows whose logits are sampled; the rows whose token the step in flight samples
    (`fill_rows`, at index `fill_from` of its tokens); the rows holding drafts, in order, and their
    entries in the batch's device drafts (none for proposals on the host)."""

    query_lens: list[int] = _numbers()
    context_lens: list[int] = _numbers()
    block_tables: list[list[int]] = field(default_factory=list)
    input_ids: list[int] = _numbers()
    positions: list[int] = _numbers()
    slots: list[int] = _numbers()
    logits_indices: list[int] = _numbers()
    fill_rows: list[int] = _numbers()
    fill_from: list[int] = _numbers()
    draft_rows: list[int] = _numbers()
    draft_entries: list[int] = _numbers()

    # The parts that every layout of a step holds at exactly their lengths (a graph pads the others).
    LOOKUP_PARTS = ("fill_rows", "fill_from", "draft_rows", "draft_entries")
    # What crosses to the other ranks, in order (the block tables as `flat_block_tables()`).
    MESSAGE_PARTS = (
        "input_ids",
        "positions",
        "slots",
        "logits_indices",
        *LOOKUP_PARTS,
    )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)

    def flat_block_tables(self, order: list[int] | None = None) -> list[int]:
        """The block tables of the sequences in `order` (default: batch order), each padded with -1 to
        the longest one's length, one after another."""
        width = max(len(table) for table in self.block_tables)
        flat: list[int] = []
        for i in range(self.num_seqs) if order is None else order:
            table = self.block_tables[i]
            flat += table
            flat += [-1] * (width - len(table))
        return flat

    def lookup_parts(self) -> list[Part]:
        return [Part(name, len(getattr(self, name))) for name in self.LOOKUP_PARTS]

    def block_table_part(self, flat: list[int]) -> Part:
        """The part holding `flat_block_tables()`' result (its width read off the flat list)."""
        return Part("block_tables", len(flat), torch.int32)
