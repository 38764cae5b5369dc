"""Proposers: where draft tokens come from. One interface, `Proposer.propose`, drafts for every
speculating sequence of a step at once, after the scheduler gave each its slots:

- `NgramProposer` (`speculative_model="[ngram]"`): prompt lookup. The longest n-gram (from
  `prompt_lookup_max` down to `prompt_lookup_min` tokens) that ends the sequence and occurred before is
  found, and the tokens that followed its first occurrence are proposed (a match that overlaps the
  suffix itself is a repeating run, continued for all k drafts). No model, drafts on the host, each a
  point mass for rejection sampling.
- `DraftModelProposer` (`speculative_model=PATH_OR_PRESET`): a smaller model with the target's
  vocabulary, run by its own `ModelRunner` over its own KV cache, which shares the target's block tables
  (one pool of blocks, sized for both). It catches up on the tokens its cache lacks, then samples k
  drafts in k steps; each step's tokens feed the next on the device, and the drafts and the distributions
  they were drawn from stay there for the target's verify step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from tensorjet.calibration.at_load import calibrated_source
from tensorjet.config import EngineConfig, LoadConfig
from tensorjet.engine.sequence import PLACEHOLDER, Sequence
from tensorjet.models.llama import max_positions_of
from tensorjet.models.loader import ModelSource, load_tokenizer, resolve_model
from tensorjet.runtime.model_runner import ModelRunner
from tensorjet.runtime.sampler import SamplingRow
from tensorjet.runtime.step import DeviceDrafts, StepBatch, StepHandle, StepSequence


@dataclass
class Proposals:
    """A step's drafts: per sequence id the tokens proposed, on the host (`token_ids`) or still on the
    device (`device`); a sequence with no drafts is absent."""

    num_drafts: dict[int, int]
    token_ids: dict[int, list[int]] | None = None
    device: DeviceDrafts | None = None


class Proposer(Protocol):
    # Runners whose KV caches share the target's block tables (sized and started with the target's).
    runners: list[ModelRunner]

    def propose(self, seqs: list[Sequence], max_drafts: list[int], rows: list[SamplingRow]) -> Proposals:
        """Up to `max_drafts[i]` drafts for `seqs[i]`, whose known tokens end with the one the step
        computes first (its slots reach `max_drafts[i]` positions past it); rows: how each samples."""
        ...


@dataclass
class _NgramIndex:
    """Where each n-gram of a sequence first ends, by the hash of its tokens; n-grams ending before
    `indexed` are in (the sequence only grows, so the index is only ever extended)."""

    first_end: dict[int, int] = dataclasses.field(default_factory=dict)
    indexed: int = 0


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.runners: list[ModelRunner] = []

    def propose(self, seqs: list[Sequence], max_drafts: list[int], rows: list[SamplingRow]) -> Proposals:
        found = {seq.seq_id: drafts for seq, k in zip(seqs, max_drafts) if (drafts := self.lookup(seq, k))}
        return Proposals({seq_id: len(d) for seq_id, d in found.items()}, token_ids=found)

    def lookup(self, seq: Sequence, k: int) -> list[int]:
        """k tokens that followed the first earlier occurrence of the longest n-gram ending `seq`, or
        none where no n-gram of `prompt_lookup_min`+ tokens occurred before."""
        tokens = seq.token_ids
        index = seq.proposer_state
        if not isinstance(index, _NgramIndex):
            index = seq.proposer_state = _NgramIndex()
        # Index the n-grams that end before the last token: each has a token after it to propose.
        for end in range(index.indexed, len(tokens) - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                index.first_end.setdefault(hash(tuple(tokens[end - n + 1 : end + 1])), end)
        index.indexed = max(index.indexed, len(tokens) - 1)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            suffix = tokens[-n:]
            end = index.first_end.get(hash(tuple(suffix)))
            if end is not None and tokens[end - n + 1 : end + 1] == suffix:  # not a hash collision
                return _continuation(tokens, end, k)
        return []


def _continuation(tokens: list[int], end: int, k: int) -> list[int]:
    """k tokens following position `end`. Where they would run past the sequence, the match overlaps
    its own suffix: the sequence repeats with period len(tokens) - 1 - end, and the proposal goes on
    repeating it rather than stopping short."""
    drafts = tokens[end + 1 : end + 1 + k]
    period = len(tokens) - 1 - end
    while len(drafts) < k:
        drafts.append(drafts[len(drafts) - period])
    return drafts


class DraftModelProposer:
    def __init__(self, config: EngineConfig, target: ModelSource, target_tokenizer, max_seq_len: int) -> None:
        name = config.speculative.speculative_model
        draft_config = _draft_config(config, max_seq_len)
        try:
            source = resolve_model(name, draft_config.load.load_format)
        except ValueError as error:
            raise ValueError(f"option speculative_model={name!r}: {error}") from None
        _check_compatible(name, source, target, target_tokenizer, max_seq_len)
        draft_format = config.speculative.speculative_model_quantization
        try:
            source = calibrated_source(draft_config, source)
            self.runner = ModelRunner(draft_config, source, max_seq_len, draft=True)
        except ValueError as error:
            if draft_format is None:
                raise
            # The draft's own format was asked for: say so, not only the draft's `quantization`.
            raise ValueError(
                f"option speculative_model_quantization={draft_format!r} (draft model {name!r}): {error}"
            ) from error
        self.runners = [self.runner]
        self.max_step_tokens = config.scheduler.max_num_tokens

    def propose(self, seqs: list[Sequence], max_drafts: list[int], rows: list[SamplingRow]) -> Proposals:
        starts = self._catch_up(seqs)
        first = [
            StepSequence(seq.seq_id, seq.token_ids[start:], start, seq.block_table, False, row)
            for seq, start, row in zip(seqs, starts, rows)
        ]
        handles = [self.runner.launch(StepBatch(first), copy_to_host=False)]
        for i in range(1, max(max_drafts)):
            # Draft i - 1, at position len(seq) + i - 1, comes from the previous step on the device.
            step = [
                StepSequence(seq.seq_id, [PLACEHOLDER], len(seq) + i - 1, seq.block_table, True, row)
                for seq, k, row in zip(seqs, max_drafts, rows)
                if k > i
            ]
            handles.append(self.runner.launch(StepBatch(step), handles[-1], copy_to_host=False))
        for seq, k in zip(seqs, max_drafts):
            seq.num_draft_computed_tokens = len(seq) + k - 1  # its last draft's KV is never computed
        return Proposals({s.seq_id: k for s, k in zip(seqs, max_drafts)}, device=_device_drafts(handles))

    def _catch_up(self, seqs: list[Sequence]) -> list[int]:
        """Compute, without sampling, what the draft's cache lacks beyond one step's token budget (a
        prompt, or tokens decoded while it did not speculate); returns where each first step starts.
        The draft's KV is valid up to the target's verified tokens (`num_computed_tokens`): past them it
        holds rejected drafts."""
        starts = [min(s.num_draft_computed_tokens, s.num_computed_tokens) for s in seqs]
        while sum(len(s) - start for s, start in zip(seqs, starts)) > self.max_step_tokens:
            budget, chunk = self.max_step_tokens, []
            for i, seq in enumerate(seqs):
                n = min(len(seq) - 1 - starts[i], budget)  # the last token waits for the sampling step
                if n > 0:
                    tokens = seq.token_ids[starts[i] : starts[i] + n]
                    chunk.append(StepSequence(seq.seq_id, tokens, starts[i], seq.block_table, False, None))
                    starts[i] += n
                    budget -= n
            if not chunk:  # only last tokens are left: the sampling step takes them all
                break
            self.runner.launch(StepBatch(chunk), copy_to_host=False)
        return starts


def _device_drafts(handles: list[StepHandle]) -> DeviceDrafts:
    """The drafts of k draft steps as one device tensor: step i's tokens follow step i - 1's."""
    index: dict[int, list[int]] = {}
    offset = 0
    for handle in handles:
        for seq_id, row in handle.row_of.items():
            index.setdefault(seq_id, []).append(offset + row)
        offset += len(handle.seq_ids)
    tokens = torch.cat([h.sampled.tokens for h in handles])
    probs = None
    if handles[0].sampled.probs is not None:  # some drafts were sampled (every step samples alike)
        probs = torch.cat([h.sampled.probs for h in handles])
    return DeviceDrafts(tokens, probs, index)


def _draft_config(config: EngineConfig, max_seq_len: int) -> EngineConfig:
    """The target's options for the draft model: the same activation dtype and requested weight format
    (`speculative_model_quantization`, else the target's: FP8 for an FP8 target; else its checkpoint's own;
    with dtype="auto" the device's default, so a 4-bit GGUF draft runs its blocks on the CPU as such a
    target does), dummy weights for a dummy target, and graphs no larger than a speculating step."""
    load = config.load
    draft_load = LoadConfig(
        model=config.speculative.speculative_model,
        load_format="dummy" if load.load_format == "dummy" else "auto",
        dtype="auto" if load.dtype == "auto" else str(config.torch_dtype).removeprefix("torch."),
        quantization=config.speculative.speculative_model_quantization or config.quantization,
        max_seq_len=max_seq_len,
    )
    scheduler = dataclasses.replace(config.scheduler, max_batch_size=config.speculative_batch_size)
    return dataclasses.replace(config, load=draft_load, scheduler=scheduler)


def _check_compatible(
    name: str, draft: ModelSource, target: ModelSource, target_tokenizer, max_seq_len: int
) -> None:
    """The draft must score the target's tokens: the same vocabulary, and positions for every sequence."""
    draft_vocab, target_vocab = draft.hf_config.vocab_size, target.hf_config.vocab_size
    if draft_vocab != target_vocab:
        raise ValueError(
            f"option speculative_model={name!r}: its vocabulary has {draft_vocab} tokens, the target's "
            f"{target_vocab}; a draft model must share the target's tokenizer"
        )
    draft_tokenizer = load_tokenizer(draft)
    if draft_tokenizer is not None and target_tokenizer is not None:
        if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
            raise ValueError(
                f"option speculative_model={name!r}: its tokenizer's vocabulary differs from the target's; "
                "a draft model must share the target's tokenizer"
            )
    positions = max_positions_of(draft.hf_config)
    if positions < max_seq_len:
        raise ValueError(
            f"option speculative_model={name!r}: it has {positions} positions, fewer than the "
            f"{max_seq_len} of a sequence (lower max_seq_len)"
        )


def build_proposer(config: EngineConfig, target: ModelSource, target_tokenizer, max_seq_len: int) -> Proposer:
    spec = config.speculative
    if spec.uses_ngram:
        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    return DraftModelProposer(config, target, target_tokenizer, max_seq_len)
