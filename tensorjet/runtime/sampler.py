"""Turns one step's logits into tokens, vectorised over the batch (vLLM semantics).

Order: raw logprobs (reported) -> banned tokens -> logit bias -> repetition penalty (prompt + output)
-> frequency/presence penalties (output) -> grammar bitmask (structured output) -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> sample. Seeded rows draw from their own generator, so their
tokens do not depend on batch-mates. Per-row settings become one tensor per call and decisions about what
to skip are taken from the Python-side params, so no step waits on the device to learn whether a penalty
is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from tensorjet.runtime.device_io import HostCopy, host_tensor_to_device, to_device
from tensorjet.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One sequence of the batch, as the sampler needs to see it this step."""

    params: SamplingParams
    generator: torch.Generator | None  # per-request generator when params.seed is set, else None
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far (both lists empty unless penalties need them)
    banned_token_ids: list[int]  # must not be sampled this step (e.g. EOS while below min_tokens)


@dataclass
class TokenBitmask:
    """The tokens some rows of a step may sample (structured output): row `rows[i]` may sample token t
    when bit t % 32 of `words[i, t // 32]` is set. On the host; the sampler copies it to the device."""

    rows: list[int]  # sampler rows, one per sequence that samples (a verify step maps them to its rows)
    words: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], words: torch.Tensor) -> torch.Tensor:
    """-inf for every token the bitmask leaves out, in `rows` of `logits` only (other rows are not
    touched, so their tokens are what they would be alone). Returns a new tensor."""
    device = logits.device
    if device not in _BIT_SHIFTS:
        _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = host_tensor_to_device(words, device)
    index = to_device(rows, torch.long, device)
    vocab = logits.shape[-1]
    allowed = ((words[:, :, None] >> _BIT_SHIFTS[device]) & 1).view(len(rows), -1)[:, :vocab].bool()
    return logits.index_put((index,), logits[index].masked_fill(~allowed, NEG_INF))


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one sampled token per row
    # Per row: None unless params.logprobs is set; else {chosen: lp} plus the top-`logprobs` tokens.
    logprobs: list[dict[int, float] | None]


def _column(rows: list[SamplingRow], name: str, device: torch.device) -> torch.Tensor:
    """One float per row from params, as a [B, 1] tensor that broadcasts over the vocabulary."""
    return to_device([float(getattr(r.params, name)) for r in rows], torch.float32, device)[:, None]


def _flat_index(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every listed token: two host->device copies, not one per row."""
    lengths = [len(ids) for ids in token_lists]
    cols = to_device(list(chain.from_iterable(token_lists)), torch.long, device)
    rows = torch.arange(len(token_lists), device=device).repeat_interleave(
        to_device(lengths, torch.long, device), output_size=sum(lengths)
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
    if any(r.params.logit_bias for r in rows):
        biases = [r.params.logit_bias or {} for r in rows]
        index = _flat_index([list(b) for b in biases], device)
        values = to_device([v for b in biases for v in b.values()], torch.float32, device)
        logits = logits.index_put(index, values.to(logits.dtype), accumulate=True)
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
    kth = to_device(top_ks, torch.long, device)[:, None] - 1 if use_top_k else None
    if use_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if use_top_k:
            sorted_logits = sorted_logits.masked_fill(sorted_logits < sorted_logits.gather(1, kth), NEG_INF)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # Rows with top_p == 1 get an infinite bound, so cumsum rounding can't drop their tail.
        top_p = [r.params.top_p if r.params.top_p < 1.0 else float("inf") for r in rows]
        sorted_logits = sorted_logits.masked_fill(
            mass_before >= to_device(top_p, torch.float32, device)[:, None], NEG_INF
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
        """Sample and bring the result to the host (waits for the device)."""
        return self.sample(logits, rows).to_host()

    def sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        keep_probs: bool = False,
        bitmask: TokenBitmask | None = None,
    ) -> SampledTokens:
        """Sample one token per row; the result stays on the device, and nothing here waits for it.

        keep_probs: also keep the distribution each non-greedy row was drawn from (a draft model's, which
        rejection sampling needs); greedy rows' are left zero. bitmask: the tokens constrained rows may
        sample."""
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = logits.log_softmax(-1)
        logits = apply_penalties(logits, rows)
        if bitmask is not None:
            logits = apply_token_bitmask(logits, bitmask.rows, bitmask.words)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        probs = None
        if len(sampled) == len(rows):
            tokens, probs = self._sample(logits, rows)
        else:
            tokens = argmax_rows(logits)
            if sampled:
                index = to_device(sampled, torch.long, logits.device)
                tokens[index], sampled_probs = self._sample(logits[index], [rows[i] for i in sampled])
                if keep_probs:
                    probs = logits.new_zeros(logits.shape).index_copy_(0, index, sampled_probs)
        return SampledTokens(
            tokens, rows, _top_logprobs(raw_logprobs, tokens, rows), probs=probs if keep_probs else None
        )

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, filters, then an exponential race: argmax(p / E), E ~ Exp(1), samples from p.
        Returns the tokens and p."""
        probs = filtered_probs(logits, rows)
        noise = self.exponential_noise(probs, rows)
        # Guards p / 0: a zero draw would turn a masked token (p == 0) into NaN, which argmax picks.
        return argmax_rows(probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)), probs

    def exponential_noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Exp(1) draws shaped as `probs`: rows without a generator from the shared one, in one call;
        a seeded row draws exactly one vocabulary-sized block from its own generator, wherever it sits in
        the batch, so its tokens are reproducible."""
        noise = torch.empty_like(probs)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            generator = self._shared_generator(probs.device)
            if len(shared) == len(rows):
                noise.exponential_(generator=generator)
            else:
                index = to_device(shared, torch.long, probs.device)
                noise[index] = probs.new_empty(len(shared), probs.shape[-1]).exponential_(generator=generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return noise

    def uniform(
        self, count: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`count` U[0, 1) draws from `generator`, or from the shared one."""
        generator = generator or self._shared_generator(device)
        return torch.rand(count, device=device, generator=generator)


def filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution a non-greedy row samples from: softmax of its logits over its temperature,
    after top-k, top-p and min-p."""
    logits = logits / _column(rows, "temperature", logits.device)
    return apply_top_k_top_p_min_p(logits, rows).softmax(-1)


ARGMAX_CHUNK = 1024


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` for a [rows, vocab] tensor (the first index of the maximum, as torch's).

    torch reduces each row with one thread block, so one row of a 128k vocabulary took 27 us on the
    H200 (a whole batch-1 step is ~4.5 ms). With few rows the vocabulary is cut into chunks of
    ARGMAX_CHUNK reduced in parallel, then the chunk maxima. On the CPU torch's argmax is not
    vectorized (2.3 ms for 32 rows of the bundled model's 49k vocabulary, one thread), its max is:
    the chunks' maxima, then an argmax within each row's first best chunk (0.4 ms)."""
    rows, vocab = x.shape
    if x.device.type == "cpu":
        chunks = _chunks(x)
        best = chunks.amax(-1).argmax(-1, keepdim=True)  # [rows, 1]: the first chunk holding the maximum
        within = chunks.gather(1, best[:, :, None].expand(rows, 1, ARGMAX_CHUNK)).squeeze(1).argmax(-1)
        return best.squeeze(-1) * ARGMAX_CHUNK + within
    if rows >= 32 or vocab < 8 * ARGMAX_CHUNK:
        return x.argmax(-1)
    values, index = _chunks(x).max(-1)
    best = values.argmax(-1, keepdim=True)
    return (index.gather(-1, best) + best * ARGMAX_CHUNK).squeeze(-1)


def _chunks(x: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] as [rows, chunks, ARGMAX_CHUNK], the last chunk padded with -inf."""
    rows, vocab = x.shape
    chunks = -(-vocab // ARGMAX_CHUNK)
    if chunks * ARGMAX_CHUNK != vocab:
        x = torch.nn.functional.pad(x, (0, chunks * ARGMAX_CHUNK - vocab), value=NEG_INF)
    return x.reshape(rows, chunks, ARGMAX_CHUNK)


def _top_logprobs(
    raw: torch.Tensor | None, tokens: torch.Tensor, rows: list[SamplingRow]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(chosen token's logprob [B], top-k logprobs [B, k], their ids [B, k]) from the raw log-softmax."""
    if raw is None:
        return None
    k = max(r.params.logprobs or 0 for r in rows)
    top_values, top_ids = raw.topk(max(k, 1), dim=-1)
    return raw.gather(1, tokens[:, None])[:, 0], top_values, top_ids


@dataclass
class SampledTokens:
    """One step's sampled tokens (and logprobs), still on the device.

    `start_copy()` queues the copy to pinned host memory; `to_host()` waits for it. Overlap scheduling
    keeps `tokens` on the device as the next step's input and reads the host copy a step later."""

    tokens: torch.Tensor  # [B] int64
    rows: list[SamplingRow]
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    probs: torch.Tensor | None = None  # [B, vocab] each row's distribution, when kept (`keep_probs`)
    _copies: list[HostCopy] | None = None

    def start_copy(self) -> None:
        if self._copies is None:
            self._copies = [HostCopy(t) for t in (self.tokens, *(self.logprobs or ()))]

    def to_host(self) -> SamplerOutput:
        self.start_copy()
        host = [c.get().tolist() for c in self._copies]
        token_ids = host[0]
        if self.logprobs is None:
            return SamplerOutput(token_ids, [None] * len(token_ids))
        chosen, top_values, top_ids = host[1:]
        out: list[dict[int, float] | None] = []
        for i, row in enumerate(self.rows):
            n = row.params.logprobs
            if n is None:
                out.append(None)
                continue
            entry = dict(zip(top_ids[i][:n], top_values[i][:n]))
            entry[token_ids[i]] = chosen[i]
            out.append(entry)
        return SamplerOutput(token_ids, out)
