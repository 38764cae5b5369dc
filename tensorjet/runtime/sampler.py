"""Turns one step's logits into tokens, vectorised over the batch (vLLM semantics).

Order: raw logprobs (reported) -> banned tokens -> repetition penalty (prompt + output) ->
frequency/presence penalties (output) -> greedy argmax, or temperature -> top-k -> top-p -> min-p ->
sample. Seeded rows draw from their own generator, so their tokens do not depend on batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorjet.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    banned_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def _column(rows: list[SamplingRow], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([float(getattr(r.params, name)) for r in rows], device=device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Banned tokens to -inf, then repetition / frequency / presence penalties (in place)."""
    device = logits.device
    for i, row in enumerate(rows):
        if row.banned_token_ids:
            logits[i, row.banned_token_ids] = float("-inf")
    rep = _column(rows, "repetition_penalty", device)
    if (rep != 1.0).any():
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids = row.prompt_token_ids + row.output_token_ids
            if ids and row.params.repetition_penalty != 1.0:
                seen[i, ids] = True
        scaled = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
        logits = torch.where(seen, scaled, logits)
    freq = _column(rows, "frequency_penalty", device)
    pres = _column(rows, "presence_penalty", device)
    if (freq != 0).any() or (pres != 0).any():
        counts = torch.zeros_like(logits)
        for i, row in enumerate(rows):
            if row.output_token_ids:
                ids = torch.tensor(row.output_token_ids, device=device)
                counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
        logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, then the top-p nucleus, then below min-p * max prob."""
    device = logits.device
    vocab = logits.shape[-1]
    top_k = torch.tensor([r.params.top_k or vocab for r in rows], device=device).clamp(max=vocab)
    top_p = _column(rows, "top_p", device)
    min_p = _column(rows, "min_p", device)
    if (top_k < vocab).any() or (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if (min_p > 0).any():
        probs = logits.softmax(-1)
        threshold = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
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
        logits = apply_penalties(logits.clone(), rows)
        greedy = torch.tensor([r.params.temperature == 0 for r in rows], device=logits.device)
        tokens = logits.argmax(-1)
        if not greedy.all():
            temps = torch.tensor([r.params.temperature or 1.0 for r in rows], device=logits.device)
            probs = apply_top_k_top_p_min_p(logits / temps[:, None], rows).softmax(-1)
            tokens = torch.where(greedy, tokens, self._draw(probs, rows))
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw_logprobs, token_ids, rows))

    def _draw(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) samples from p, one noise row per request."""
        noise = torch.empty_like(probs)
        shared = self._shared_generator(probs.device)
        for i, row in enumerate(rows):
            if row.params.temperature != 0:
                noise[i].exponential_(generator=row.generator or shared)
            else:
                noise[i] = 1.0
        return (probs / noise).argmax(-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, token_ids: list[int], rows: list[SamplingRow]):
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
