"""One sequence's state as it moves waiting -> running -> finished (and back to waiting if preempted).

A sequence always has `token_ids` = prompt + generated tokens and `num_computed_tokens` of them in
the KV cache. Each step computes the next slice of the rest; when that slice reaches the end, the
step samples one more token. Prefill, chunked prefill, decode and recompute after preemption are
all this one rule.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque

import torch

from tensorjet.config import ACCEPTANCE_WINDOW
from tensorjet.engine.structured_output import GrammarState
from tensorjet.outputs import TokenLogprobs
from tensorjet.runtime.sampler import SamplingRow
from tensorjet.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()

# A sampled token whose value is still on the device (overlap scheduling): it counts as a token for
# scheduling, and the engine fills it in one step later.
PLACEHOLDER = -1


class Sequence:
    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_committed_blocks = 0  # leading blocks already offered to the prefix cache
        self.block_keys: list[tuple[int, tuple[int, ...]]] = []  # per full block: (chained hash, tokens)
        self.num_cached_prompt_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.prefix_looked_up = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprobs] = []
        # One entry per prompt token (the first has no predecessor, so None), when requested.
        self.prompt_logprobs: list[TokenLogprobs | None] = [None]
        self.sampling_row: SamplingRow | None = None  # the engine's, once it no longer changes
        # Structured output: its place in the request's grammar (a `GrammarState`), advanced by every
        # token it keeps.
        self.grammar: GrammarState | None = None
        # Speculative decoding. Tokens whose KV a draft model's cache holds (it shares the block table, so
        # losing the blocks resets it); a proposer's own state (an n-gram index); (drafted, accepted) of
        # the last verify steps; whether it still speculates.
        self.num_draft_computed_tokens = 0
        self.proposer_state: object | None = None
        self.verify_history: deque[tuple[int, int]] = deque(maxlen=ACCEPTANCE_WINDOW)
        self.speculates = True
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose value is on the host: all but a trailing placeholder."""
        return len(self.token_ids) - (self.token_ids[-1] == PLACEHOLDER)

    @property
    def known_output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : self.num_known_tokens]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_time = time.monotonic()
