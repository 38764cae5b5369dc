"""Verifying draft tokens: rejection sampling over one step's target logits (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling").

A sequence with drafts d_1..d_m owns m + 1 consecutive sampled rows: row i holds the target's logits
after its context and d_1..d_i. Let p_i be the distribution the target samples from at row i (the
`Sampler`'s penalties, temperature, top-k, top-p and min-p) and q_i the one d_{i+1} was drawn from (a
point mass for proposals without a distribution, such as n-gram lookups). Draft d_{i+1} is accepted with
probability min(1, p_i(d) / q_i(d)); the first rejected row samples from the residual max(p_i - q_i, 0)
(normalized), and when all m are accepted the last row samples one more token from p_m. Every emitted
token is then distributed exactly as the target alone would sample it. A greedy sequence keeps its drafts
while they equal the target's argmax and then takes the argmax: greedy decoding, token for token.

Everything is decided from host-side parameters and queued on the device without reading a device value;
the result comes back to the host as `SampledTokens` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from tensorjet.outputs import TokenLogprobs
from tensorjet.runtime.device_io import HostCopy, to_device
from tensorjet.runtime.sampler import (
    Sampler,
    SamplingRow,
    TokenBitmask,
    apply_penalties,
    apply_token_bitmask,
    argmax_rows,
    filtered_probs,
)


@dataclass
class VerifiedOutput:
    """Per sequence: the tokens it keeps (accepted drafts, then one sampled token) and their logprobs."""

    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]


@dataclass
class VerifiedTokens:
    """One verify step's tokens, still on the device: sequence s keeps `tokens[s, :counts[s]]`."""

    tokens: torch.Tensor  # [S, K + 1] int64, K the most drafts of any sequence
    counts: torch.Tensor  # [S] int64: accepted drafts + 1
    rows: list[SamplingRow]
    # (chosen token's logprob [S, K + 1], top logprobs [S, K + 1, n], their ids), from the raw logits
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    _copies: list[HostCopy] | None = None

    def start_copy(self) -> None:
        if self._copies is None:
            self._copies = [HostCopy(t) for t in (self.tokens, self.counts, *(self.logprobs or ()))]

    def to_host(self) -> VerifiedOutput:
        self.start_copy()
        host = [c.get().tolist() for c in self._copies]
        tokens = [row[:count] for row, count in zip(host[0], host[1])]
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(tokens)
        if self.logprobs is not None:
            chosen, top_values, top_ids = host[2:]
            for s, row in enumerate(self.rows):
                n = row.params.logprobs
                if n is None:
                    continue
                entries = []
                for i, token in enumerate(tokens[s]):
                    entry = dict(zip(top_ids[s][i][:n], top_values[s][i][:n]))
                    entry[token] = chosen[s][i]
                    entries.append(entry)
                logprobs[s] = entries
        return VerifiedOutput(tokens, logprobs)


@dataclass
class _Layout:
    """Where each sequence's rows sit, as index lists (host) for one step."""

    row_params: list[SamplingRow]  # per logits row: its sequence's row
    draft_rows: list[int]  # per draft (in order): the logits row that verifies it
    padded_rows: list[int]  # per (sequence, position < K + 1): its logits row (past its own: its last)
    padded_drafts: list[int]  # per draft: its place in the [S, K] grid

    @classmethod
    def of(cls, rows: list[SamplingRow], num_drafts: list[int]) -> _Layout:
        width = max(num_drafts) + 1
        starts = [0, *accumulate(m + 1 for m in num_drafts)]
        layout = cls([], [], [], [])
        for s, (row, m) in enumerate(zip(rows, num_drafts)):
            first = starts[s]
            layout.row_params += [row] * (m + 1)
            layout.draft_rows += range(first, first + m)
            layout.padded_rows += [first + min(i, m) for i in range(width)]
            layout.padded_drafts += range(s * (width - 1), s * (width - 1) + m)
        return layout


def accepts(uniform: torch.Tensor, target_p: torch.Tensor, draft_q: torch.Tensor) -> torch.Tensor:
    """Keep a draft with probability min(1, p(d) / q(d)), from one U[0, 1) draw each (p(d) = 0 never)."""
    return uniform * draft_q < target_p


class RejectionSampler:
    """Keeps or rejects each sequence's drafts and samples the token after the kept ones."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler  # its shared generator serves unseeded rows
        # Benchmark-only: accept each draft with this probability whatever the distributions say (the
        # token after the accepted ones still comes from the target), to time a chosen acceptance rate.
        self.fixed_acceptance: float | None = None

    def verify(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        num_drafts: list[int],
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None = None,
        bitmask: TokenBitmask | None = None,
    ) -> VerifiedTokens:
        """logits: [sum(m + 1), vocab] float32, each sequence's m + 1 rows in turn; rows and num_drafts:
        per sequence; draft_tokens: [sum(m)] its drafts in turn; draft_probs: [sum(m), vocab] the
        distribution each draft was drawn from, None where drafts are point masses; bitmask: the tokens
        constrained sequences may sample, which never draft (their one row is masked)."""
        device = logits.device
        layout = _Layout.of(rows, num_drafts)
        num_seqs, width = len(rows), max(num_drafts) + 1
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = logits.log_softmax(-1)
        logits = apply_penalties(logits, layout.row_params)
        if bitmask is not None:
            last_rows = list(accumulate(m + 1 for m in num_drafts))
            logits = apply_token_bitmask(logits, [last_rows[s] - 1 for s in bitmask.rows], bitmask.words)
        draft_rows = to_device(layout.draft_rows, torch.long, device)
        # The greedy choice of every row; a non-greedy sequence's rows are replaced below.
        recovered = argmax_rows(logits)
        accepted = recovered[draft_rows] == draft_tokens
        sampled = [s for s, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            self._sample_rows(
                logits, rows, num_drafts, sampled, draft_tokens, draft_probs, recovered, accepted
            )
        if self.fixed_acceptance is not None:
            accepted = self._uniform_draws(rows, num_drafts, range(num_seqs), device) < self.fixed_acceptance

        grid = torch.zeros(num_seqs * (width - 1), dtype=torch.int64, device=device)
        padded_drafts = to_device(layout.padded_drafts, torch.long, device)
        accepted_grid = grid.index_put((padded_drafts,), accepted.long()).view(num_seqs, width - 1)
        num_accepted = accepted_grid.cumprod(1).sum(1)  # leading accepted drafts
        drafts_grid = torch.zeros(num_seqs, width, dtype=torch.int64, device=device)
        drafts_grid[:, :-1] = grid.index_put((padded_drafts,), draft_tokens).view(num_seqs, width - 1)
        padded_rows = to_device(layout.padded_rows, torch.long, device)
        recovered_grid = recovered[padded_rows].view(num_seqs, width)
        position = torch.arange(width, device=device)
        tokens = torch.where(position < num_accepted[:, None], drafts_grid, recovered_grid)
        logprobs = None
        if raw_logprobs is not None:
            raw = raw_logprobs[padded_rows]
            top = max(max(r.params.logprobs or 0 for r in rows), 1)
            top_values, top_ids = raw.topk(top, dim=-1)
            chosen = raw.gather(1, tokens.view(-1, 1))[:, 0]
            logprobs = (
                chosen.view(num_seqs, width),
                top_values.view(num_seqs, width, top),
                top_ids.view(num_seqs, width, top),
            )
        return VerifiedTokens(tokens, num_accepted + 1, rows, logprobs)

    def _sample_rows(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        num_drafts: list[int],
        sampled: list[int],
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        recovered: torch.Tensor,
        accepted: torch.Tensor,
    ) -> None:
        """The non-greedy sequences `sampled`: accept their drafts by p / q and draw each row's token from
        its residual (draft rows) or from p (last rows), writing into `recovered` and `accepted`."""
        device = logits.device
        starts = [0, *accumulate(m + 1 for m in num_drafts)]
        draft_starts = [0, *accumulate(num_drafts)]
        logit_rows, local_drafts, drafts, row_params = [], [], [], []
        for s in sampled:
            m = num_drafts[s]
            local_drafts += range(len(logit_rows), len(logit_rows) + m)
            logit_rows += range(starts[s], starts[s] + m + 1)
            drafts += range(draft_starts[s], draft_starts[s] + m)
            row_params += [rows[s]] * (m + 1)
        logit_rows_t = to_device(logit_rows, torch.long, device)
        local_t = to_device(local_drafts, torch.long, device)
        drafts_t = to_device(drafts, torch.long, device)
        probs = filtered_probs(logits[logit_rows_t], row_params)
        tokens = draft_tokens[drafts_t]
        target_p = probs[local_t, tokens]
        residual = probs.clone()
        if draft_probs is None:  # a point mass: accept with probability p(d); the residual is p without d
            draft_q = torch.ones_like(target_p)
            residual[local_t, tokens] = 0.0
        else:
            q = draft_probs[drafts_t]
            draft_q = q.gather(1, tokens[:, None])[:, 0]
            residual[local_t] = (probs[local_t] - q).clamp_min_(0.0)
        # p == q leaves no residual; a rejection can then only come from rounding, and p is the answer.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs)
        accepted[drafts_t] = accepts(
            self._uniform_draws(rows, num_drafts, sampled, device), target_p, draft_q
        )
        noise = self.sampler.exponential_noise(residual, row_params)
        recovered[logit_rows_t] = argmax_rows(residual / noise.clamp_min_(torch.finfo(noise.dtype).tiny))

    def _uniform_draws(self, rows: list[SamplingRow], num_drafts: list[int], seqs, device) -> torch.Tensor:
        """One U[0, 1) draw per draft of the sequences `seqs`, in order: unseeded ones from the shared
        generator in one call, a seeded one from its own generator, so its tokens do not depend on the
        rest of the batch."""
        seqs = list(seqs)
        shared = [s for s in seqs if rows[s].generator is None]
        shared_draws = self.sampler.uniform(sum(num_drafts[s] for s in shared), device)
        parts, taken = [], 0
        for s in seqs:
            m = num_drafts[s]
            if rows[s].generator is None:
                parts.append(shared_draws[taken : taken + m])
                taken += m
            else:
                parts.append(self.sampler.uniform(m, device, rows[s].generator))
        return torch.cat(parts)
