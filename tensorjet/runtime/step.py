"""What crosses between the engine and the runtime for one step.

The engine describes a step as a `StepBatch` (plain data: per sequence the tokens to compute, where
they sit, its block table and what to sample) and gets back a `StepHandle` at once; `handle.result()`
waits for the device and returns a `StepResult` (new tokens and logprobs per sequence, prompt logprobs
per sequence). The runtime never sees the engine's sequences and the engine never writes the runtime's
state: each side keeps its own.

Overlap scheduling: a step may be launched before the previous one's tokens reach the host. The
engine then marks a sequence whose last token is the previous step's sample as `last_token_pending`,
and the runtime takes that token from the previous handle on the device.

Speculative decoding: a sequence's last `num_drafts` rows may be proposed tokens. The step samples
after each of its last `num_drafts + 1` rows and keeps the drafts that rejection sampling accepts, so
its result holds 1 to `num_drafts + 1` tokens. Drafts are either in `token_ids` (host proposals) or,
from a draft model, still on the device (`DeviceDrafts`, with the draft's distributions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tensorjet.outputs import TokenLogprobs
from tensorjet.runtime.rejection_sampler import VerifiedTokens
from tensorjet.runtime.sampler import SampledTokens, SamplingRow, TokenBitmask


@dataclass(slots=True)
class PromptLogprobsRequest:
    """Report logprobs of prompt tokens: the rows at positions first, first + 1, ... predict the prompt
    tokens `targets` (position p predicts token p + 1), each entry listing the `top` likeliest tokens."""

    first: int
    targets: list[int]
    top: int


@dataclass(slots=True)
class StepSequence:
    """One sequence of a step: it computes `token_ids` at positions start, start + 1, ... (their keys and
    values enter the cache through `block_table`) and attends over everything before them."""

    seq_id: int
    token_ids: list[int]  # its query rows this step (one for a decode, several for a prompt chunk)
    start: int  # tokens already in the cache (the position of token_ids[0])
    block_table: list[int]  # cache block of each block_size positions; covers start + len(token_ids)
    # token_ids[-1] stands for the token the step in flight samples for this sequence: its value is
    # taken from that step's handle on the device.
    last_token_pending: bool
    # What to sample after the last row; None: nothing (a prompt's early chunk).
    sampling: SamplingRow | None
    prompt_logprobs: PromptLogprobsRequest | None = None
    # Its last num_drafts rows are draft tokens to verify (then `sampling` is set): their values are
    # in token_ids, or PLACEHOLDERs taken from the batch's `DeviceDrafts`.
    num_drafts: int = 0


@dataclass
class DeviceDrafts:
    """Draft tokens a draft model sampled, still on the device: entry `index[seq_id][i]` of `tokens` is
    that sequence's i-th draft, and the same row of `probs` the distribution it was drawn from (None:
    every draft was greedy, so no distribution is needed)."""

    tokens: torch.Tensor  # [N] int64
    probs: torch.Tensor | None  # [N, vocab] float32
    index: dict[int, list[int]]


@dataclass
class StepBatch:
    seqs: list[StepSequence]
    drafts: DeviceDrafts | None = None  # where the PLACEHOLDER draft rows' values are
    # Structured output: called once the step's forward pass is queued (the engine computes the grammar
    # masks while the device runs it); returns the tokens each constrained sequence may sample.
    token_bitmask: Callable[[], TokenBitmask | None] | None = None

    @property
    def query_lens(self) -> list[int]:
        return [len(s.token_ids) for s in self.seqs]


@dataclass
class StepResult:
    """A finished step on the host: for each sequence that sampled (batch order), its new tokens."""

    seq_ids: list[int]
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]  # one entry per new token; None unless the sequence asked
    prompt_logprobs: dict[int, list[TokenLogprobs]]  # seq id -> entries of the prompt positions computed


@dataclass
class PendingPromptLogprobs:
    """Prompt logprobs of one step, still on the device: row i belongs to the sequence of its run in
    `seq_ids`/`counts` and predicts `targets[i]`."""

    seq_ids: list[int]
    counts: list[int]
    tops: list[int]
    targets: list[int]
    chosen: torch.Tensor  # [rows] the target's logprob
    top_values: torch.Tensor  # [rows, k]
    top_ids: torch.Tensor  # [rows, k]

    def to_host(self) -> dict[int, list[TokenLogprobs]]:
        chosen, top_values, top_ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        entries: dict[int, list[TokenLogprobs]] = {}
        row = 0
        for seq_id, count, top in zip(self.seq_ids, self.counts, self.tops):
            seq_entries = entries.setdefault(seq_id, [])
            for i in range(row, row + count):
                entry = dict(zip(top_ids[i][:top], top_values[i][:top]))
                entry[self.targets[i]] = chosen[i]
                seq_entries.append(entry)
            row += count
        return entries


class StepHandle:
    """A launched step: the sequences it samples for, and their tokens, still on the device (one token
    each, or, for a step that verifies drafts, `VerifiedTokens`: one to 1 + drafts each)."""

    def __init__(
        self,
        seq_ids: list[int],
        sampled: SampledTokens | VerifiedTokens | None,
        prompt_logprobs: PendingPromptLogprobs | None = None,
    ) -> None:
        self.seq_ids = seq_ids
        self.sampled = sampled
        self.prompt_logprobs = prompt_logprobs
        self.row_of = {seq_id: i for i, seq_id in enumerate(seq_ids)}  # a sequence's row in `sampled`

    def result(self) -> StepResult:
        """Wait for the step and return what it produced, on the host."""
        prompt = {} if self.prompt_logprobs is None else self.prompt_logprobs.to_host()
        if self.sampled is None:
            return StepResult([], [], [], prompt)
        if isinstance(self.sampled, VerifiedTokens):
            verified = self.sampled.to_host()
            return StepResult(self.seq_ids, verified.token_ids, verified.logprobs, prompt)
        out = self.sampled.to_host()
        logprobs = [None if lp is None else [lp] for lp in out.logprobs]
        return StepResult(self.seq_ids, [[t] for t in out.token_ids], logprobs, prompt)
