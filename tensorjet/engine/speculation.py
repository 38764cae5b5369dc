"""Speculation policy: which sequences draft how many tokens each step, and what came of it.

A step speculates while at most `speculative_disable_by_batch_size` sequences are running or waiting
(a large batch's step is already compute-bound, so extra rows cost what they might save) and one of
them may still draft (otherwise steps overlap as without speculation). A decoding sequence then gets
up to `num_speculative_tokens` more slots (`lookahead`), capped by its max_tokens and the longest
sequence, and the proposer fills them. After the verify step each sequence keeps its accepted
drafts (`record`); one whose acceptance rate over its recent verify steps falls below
`speculative_disable_by_acceptance_rate` stops speculating.

Sequences that sample with penalties (the history of every row would differ by the drafts before it),
that still ban EOS (min_tokens), or that follow a grammar (structured output: each draft row would need
the mask of the grammar advanced by the drafts before it) decode one token at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from itertools import chain

from tensorjet.config import MIN_ACCEPTANCE_STEPS, EngineConfig
from tensorjet.engine.proposers import Proposals, Proposer, build_proposer
from tensorjet.engine.scheduler import ScheduledBatch
from tensorjet.engine.sequence import PLACEHOLDER, Sequence
from tensorjet.models.loader import ModelSource
from tensorjet.runtime.model_runner import ModelRunner
from tensorjet.runtime.sampler import SamplingRow


class Speculator:
    def __init__(self, config: EngineConfig, proposer: Proposer, max_seq_len: int) -> None:
        spec = config.speculative
        self.num_tokens = spec.num_tokens
        self.max_batch = spec.speculative_disable_by_batch_size
        self.min_acceptance_rate = spec.speculative_disable_by_acceptance_rate
        self.proposer = proposer
        self.max_seq_len = max_seq_len
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_verify_steps = 0  # one per sequence whose drafts a step verified
        self.num_stopped = 0  # sequences that stopped speculating for low acceptance

    @property
    def runners(self) -> list[ModelRunner]:
        return self.proposer.runners

    def active(self, *groups: Collection[Sequence]) -> bool:
        """Whether a step with the sequences of `groups` (running, waiting) speculates: not past the
        batch size limit, and only while one of them may draft (the engine then gives up overlap to
        know their last tokens; once every sequence has stopped speculating, steps overlap as without a
        draft)."""
        if self.max_batch is not None and sum(map(len, groups)) > self.max_batch:
            return False
        return any(self.may_draft(seq) for seq in chain(*groups))

    @staticmethod
    def may_draft(seq: Sequence) -> bool:
        """Whether `seq` drafts once its last token is known."""
        params = seq.params
        return (
            seq.speculates
            and seq.grammar is None
            and not params.needs_token_history
            and seq.num_output_tokens >= params.min_tokens
        )

    def lookahead(self, seq: Sequence) -> int:
        """Draft tokens `seq` may verify this step."""
        params = seq.params
        if not self.may_draft(seq) or seq.token_ids[-1] == PLACEHOLDER:
            return 0
        # Every draft may be accepted, and one more token follows: room for drafts + 1 tokens.
        room = min(params.max_tokens - seq.num_output_tokens, self.max_seq_len - len(seq)) - 1
        return max(0, min(self.num_tokens, room))

    def propose(
        self, batch: ScheduledBatch, sampling_row: Callable[[Sequence], SamplingRow]
    ) -> Proposals | None:
        """Drafts for the sequences the scheduler gave slots past their own tokens, in one batch."""
        seqs, max_drafts = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            extra = n - seq.num_uncomputed_tokens
            if extra > 0:
                seqs.append(seq)
                max_drafts.append(extra)
        if not seqs:
            return None
        return self.proposer.propose(seqs, max_drafts, [sampling_row(seq) for seq in seqs])

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.num_verify_steps += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        history = seq.verify_history
        history.append((drafted, accepted))
        if self.min_acceptance_rate > 0 and len(history) >= MIN_ACCEPTANCE_STEPS:
            recent_drafted = sum(d for d, _ in history)
            recent_accepted = sum(a for _, a in history)
            if recent_accepted < self.min_acceptance_rate * recent_drafted:
                seq.speculates = False
                self.num_stopped += 1

    def stats(self) -> dict:
        return speculation_stats(
            self.num_draft_tokens, self.num_accepted_tokens, self.num_verify_steps, self.num_stopped
        )


def speculation_stats(drafted: int = 0, accepted: int = 0, verify_steps: int = 0, stopped: int = 0) -> dict:
    """The engine's speculation counters (all zero for an engine that does not speculate)."""
    return {
        "speculative_draft_tokens": drafted,
        "speculative_accepted_tokens": accepted,
        "speculative_verify_steps": verify_steps,
        "speculative_acceptance_rate": accepted / max(drafted, 1),
        "speculative_mean_accepted_tokens": accepted / max(verify_steps, 1),
        "speculative_stopped_sequences": stopped,
    }


def build_speculator(
    config: EngineConfig, target: ModelSource, tokenizer, max_seq_len: int
) -> Speculator | None:
    if not config.speculative.enabled:
        return None
    return Speculator(config, build_proposer(config, target, tokenizer, max_seq_len), max_seq_len)
