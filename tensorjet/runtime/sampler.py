"""Turns one step's logits into tokens, vectorised over the batch (vLLM semantics).

Order: raw logprobs (reported) -> banned tokens -> repetition penalty (prompt + output) ->
frequency/presence penalties (output) -> greedy argmax, or temperature -> top-k -> top-p -> min-p ->
sample. Seeded rows draw from their own generator, so their tokens do not depend on batch-mates.
Per-row settings become one tensor per call and decisions about what to skip are taken from the
Python-side params, so no step waits on the device to learn whether a penalty is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from tensorjet.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One sequence of the batch, as the sampler needs to see it this step."""

    params: SamplingParams
    generator: torch.Generator | None  # per-request generator when params.seed is set, else None
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far by this sequence
    banned_token_ids: list[int]  # must not be sampled this step (e.g. EOS while below min_tokens)


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one sampled token per row
    # Per row: None unless params.logprobs is set; else {chosen: lp} plus the top-`logprobs` tokens.
    logprobs: list[dict[int, float] | None]


def _column(rows: list[SamplingRow], name: str, device: torch.device) -> torch.Tensor:
    """One float per row from params, as a [B, 1] tensor that broadcasts over the vocabulary."""
    return torch.tensor([float(getattr(r.params, name)) for r in rows], device=device)[:, None]


def _flat_index(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every listed token: two host->device copies, not one per row."""
    lengths = [len(ids) for ids in token_lists]
    cols = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    rows = torch.arange(len(token_lists), device=device).repeat_interleave(
        torch.tensor(lengths, device=device), output_size=sum(lengths)
    )
    return rows, cols


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Banned tokens to -inf, then repetition (prompt + output) and frequency/presence (output only).

    Returns a new tensor when anything applies; never modifies `logits`.
    """
    device = logits.device
    if any(r.banned_token_ids for r in rows):
        banned = _flat_index([r.banned_token_ids for r in rows], device)
        logits = logits.index_put(banned, logits.new_full((), NEG_INF))
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        seen_ids = [
            r.prompt_token_ids + r.output_token_ids if r.params.repetition_penalty != 1.0 else []
            for r in rows
        ]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[_flat_index(seen_ids, device)] = True
        penalty = _column(rows, "repetition_penalty", device)
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if any(r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in rows):
        index = _flat_index([r.output_token_ids for r in rows], device)
        counts = torch.zeros_like(logits)
        counts.index_put_(index, counts.new_ones(index[1].numel()), accumulate=True)
        logits = (
            logits
            - _column(rows, "frequency_penalty", device) * counts
            - _column(rows, "presence_penalty", device) * (counts > 0)
        )
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, then outside the top-p nucleus, then below min-p.

    Top-k keeps ties with the k-th value (as vLLM does). Top-p is measured on the distribution left by
    top-k and drops a token once the tokens ranked above it already reach top_p, so the top token always
    stays. Min-p compares against the max probability, which is a logit difference of log(min_p).
    """
    device = logits.device
    vocab = logits.shape[-1]
    top_ks = [min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in rows]
    use_top_k = any(k < vocab for k in top_ks)
    use_top_p = any(r.params.top_p < 1.0 for r in rows)
    kth = torch.tensor(top_ks, device=device)[:, None] - 1 if use_top_k else None
    if use_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if use_top_k:
            sorted_logits = sorted_logits.masked_fill(sorted_logits < sorted_logits.gather(1, kth), NEG_INF)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # Rows with top_p == 1 get an infinite bound, so cumsum rounding can't drop their tail.
        top_p = [r.params.top_p if r.params.top_p < 1.0 else float("inf") for r in rows]
        sorted_logits = sorted_logits.masked_fill(
            mass_before >= torch.tensor(top_p, device=device)[:, None], NEG_INF
        )
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    elif use_top_k:
        kth_values = logits.topk(max(top_ks), dim=-1).values.gather(1, kth)
        logits = logits.masked_fill(logits < kth_values, NEG_INF)
    if any(r.params.min_p > 0.0 for r in rows):
        # log(0) = -inf, so rows with min_p == 0 keep everything.
        bound = logits.amax(-1, keepdim=True) + _column(rows, "min_p", device).log()
        logits = logits.masked_fill(logits < bound, NEG_INF)
    return logits


class Sampler:
    """Samples one token per row; rows without their own generator share one seeded per device."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = logits.log_softmax(-1)
        logits = apply_penalties(logits, rows)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sampled) == len(rows):
            tokens = self._sample(logits, rows)
        else:
            tokens = logits.argmax(-1)
            if sampled:
                index = torch.tensor(sampled, device=logits.device)
                tokens[index] = self._sample(logits[index], [rows[i] for i in sampled])
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, _logprobs(raw_logprobs, token_ids, rows))

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, filters, then an exponential race: argmax(p / E), E ~ Exp(1), samples from p."""
        logits = logits / _column(rows, "temperature", logits.device)
        probs = apply_top_k_top_p_min_p(logits, rows).softmax(-1)
        noise = torch.empty_like(probs)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            generator = self._shared_generator(probs.device)
            if len(shared) == len(rows):
                noise.exponential_(generator=generator)
            else:
                index = torch.tensor(shared, device=probs.device)
                noise[index] = probs.new_empty(len(shared), probs.shape[-1]).exponential_(generator=generator)
        # A seeded row draws exactly one vocabulary-sized block from its own generator per step,
        # wherever it sits in the batch, so its tokens are reproducible.
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        # Guards p / 0: a zero draw would turn a masked token (p == 0) into NaN, which argmax picks.
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(-1)


def _logprobs(
    raw: torch.Tensor | None, token_ids: list[int], rows: list[SamplingRow]
) -> list[dict[int, float] | None]:
    """{chosen: lp} plus the row's top-n from the raw (unpenalised) log-softmax, for rows that ask."""
    if raw is None:
        return [None] * len(rows)
    k = max(r.params.logprobs or 0 for r in rows)
    top_values, top_ids = raw.topk(max(k, 1), dim=-1)
    chosen = raw.gather(1, torch.tensor(token_ids, device=raw.device)[:, None])[:, 0].tolist()
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out: list[dict[int, float] | None] = []
    for i, row in enumerate(rows):
        n = row.params.logprobs
        if n is None:
            out.append(None)
            continue
        entry = dict(zip(top_ids[i][:n], top_values[i][:n]))
        entry[token_ids[i]] = chosen[i]
        out.append(entry)
    return out
