"""Sampler semantics against straightforward per-row Python references (vLLM order and meaning)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from tensorjet.runtime.sampler import (
    ARGMAX_CHUNK,
    Sampler,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p_min_p,
    argmax_rows,
)
from tensorjet.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Distinct, unsorted logits: the sorted order (1, 3, 6, 0, 7, 4, 2, 5) differs from the index order.
SMALL_LOGITS = [1.2, 3.0, -0.5, 2.1, 0.3, -2.0, 1.7, 0.9]
NUM_DRAWS = 20_000
TOLERANCE = 0.015  # ~4 standard deviations of an empirical frequency at 20k draws


def make_row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    banned: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> SamplingRow:
    return SamplingRow(params, generator, prompt or [], output or [], banned or [])


def seeded(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def reference_penalties(logits: list[float], row: SamplingRow) -> list[float]:
    """Element by element, as the semantics are written down."""
    p = row.params
    out = list(logits)
    for t in row.banned_token_ids:
        out[t] = -math.inf
    seen = set(row.prompt_token_ids) | set(row.output_token_ids)
    counts = Counter(row.output_token_ids)
    for t in range(len(out)):
        if t in seen:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        out[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    return out


def reference_distribution(logits: list[float], p: SamplingParams) -> list[float]:
    """softmax(logits / T) restricted to top-k, then the top-p nucleus of what is left, then min-p."""
    scaled = [v / p.temperature for v in logits]
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    keep = set(order)
    if p.top_k:
        keep = {t for t in keep if scaled[t] >= scaled[order[p.top_k - 1]]}

    def probs() -> dict[int, float]:
        kept = sorted(keep)
        return dict(zip(kept, softmax([scaled[t] for t in kept])))

    if p.top_p < 1.0:
        current, nucleus, mass = probs(), set(), 0.0
        for t in (t for t in order if t in keep):
            if mass >= p.top_p:
                break
            nucleus.add(t)
            mass += current[t]
        keep = nucleus
    if p.min_p > 0.0:
        current = probs()
        keep = {t for t in keep if current[t] >= p.min_p * max(current.values())}
    current = probs()
    return [current.get(t, 0.0) for t in range(len(logits))]


FILTER_CASES = {
    "top_k": SamplingParams(top_k=3),
    "top_p": SamplingParams(top_p=0.75),
    "min_p": SamplingParams(min_p=0.1),
    # Top-p on what top-k left keeps {1, 3, 6}; top-p on the full distribution would also keep 0.
    "top_k_then_top_p": SamplingParams(top_k=4, top_p=0.85),
    # Min-p after top-p keeps {1, 3, 6}; min-p first would shrink the nucleus to {1, 3}.
    "top_p_then_min_p": SamplingParams(top_p=0.75, min_p=0.15),
    "all_with_temperature": SamplingParams(temperature=2.0, top_k=6, top_p=0.9, min_p=0.3),
    "temperature_low": SamplingParams(temperature=0.5),
    "temperature_high": SamplingParams(temperature=2.0),
}


def empirical(tokens: list[int], vocab: int) -> list[float]:
    counts = Counter(tokens)
    return [counts[t] / len(tokens) for t in range(vocab)]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_and_leaves_generators_alone(device):
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(0)).to(device)
    generator = seeded(5, device)
    state = generator.get_state()
    greedy = SamplingParams(temperature=0.0, top_k=2, top_p=0.1, min_p=0.9)
    rows = [make_row(greedy, generator=generator if i == 2 else None) for i in range(6)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()
    # Mixed with sampled rows, the greedy rows still take the argmax.
    rows[1] = make_row(SamplingParams(temperature=1.0))
    rows[4] = make_row(SamplingParams(temperature=0.7, top_k=5), generator=seeded(6, device))
    tokens = Sampler()(logits, rows).token_ids
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 3, 5)] == [argmax[i] for i in (0, 2, 3, 5)]
    assert torch.equal(generator.get_state(), state), "a greedy row must not draw from its generator"


@pytest.mark.parametrize("device", DEVICES)
def test_banned_tokens_are_never_chosen(device):
    logits = torch.tensor([SMALL_LOGITS], device=device)
    greedy = make_row(SamplingParams(temperature=0.0), banned=[1])
    assert Sampler()(logits, [greedy]).token_ids == [3]  # the runner-up
    banned = [1, 3, 5]
    rows = [make_row(SamplingParams(temperature=1.5), banned=banned)] * 5000
    tokens = Sampler(seed=1)(logits.expand(len(rows), -1), rows).token_ids
    assert not set(tokens) & set(banned)
    assert len(set(tokens)) == len(SMALL_LOGITS) - len(banned)


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_reference(device):
    rng = random.Random(0)
    vocab = 20
    logits = torch.randn(7, vocab, generator=torch.Generator().manual_seed(1)) * 3
    top = logits.argmax(-1).tolist()
    rows = [
        make_row(SamplingParams(temperature=0.0)),  # no penalty at all
        make_row(SamplingParams(temperature=0.0, repetition_penalty=1.8), prompt=[top[1], 3, 3, 7]),
        make_row(SamplingParams(temperature=0.0, repetition_penalty=0.6), output=[2, 5, top[2]]),
        make_row(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=[top[3]] * 3 + [1]),
        make_row(SamplingParams(temperature=0.0, presence_penalty=-1.5), prompt=[4], output=[9, 9, 11]),
        make_row(
            SamplingParams(
                temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=1.1
            ),
            prompt=[rng.randrange(vocab) for _ in range(12)],
            output=[rng.randrange(vocab) for _ in range(15)],
            banned=[top[5], 0],
        ),
        # Prompt tokens get the repetition penalty only; frequency/presence count outputs only.
        make_row(
            SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0),
            prompt=[top[6], 8],
            output=[8],
        ),
    ]
    expected = torch.tensor([reference_penalties(logits[i].tolist(), r) for i, r in enumerate(rows)])
    logits = logits.to(device)
    original = logits.clone()
    torch.testing.assert_close(apply_penalties(logits, rows).cpu(), expected)
    assert torch.equal(logits, original), "apply_penalties must not modify its input"
    tokens = Sampler()(logits, rows).token_ids
    assert tokens == expected.argmax(-1).tolist()
    assert tokens != top, "the penalties should change at least one greedy choice"


def test_filters_keep_the_reference_tokens():
    logits = torch.tensor([SMALL_LOGITS] * len(FILTER_CASES))
    rows = [make_row(p) for p in FILTER_CASES.values()]
    temps = torch.tensor([[p.temperature] for p in FILTER_CASES.values()])
    kept = apply_top_k_top_p_min_p(logits / temps, rows).isfinite()
    for i, (name, params) in enumerate(FILTER_CASES.items()):
        expected = [p > 0 for p in reference_distribution(SMALL_LOGITS, params)]
        assert kept[i].tolist() == expected, name


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_distribution_matches_reference(device):
    """One batch holds every case, NUM_DRAWS identical rows each, so per-row parameters must line up."""
    rows = [row for p in FILTER_CASES.values() for row in [make_row(p)] * NUM_DRAWS]
    logits = torch.tensor([SMALL_LOGITS], device=device).expand(len(rows), -1)
    tokens = Sampler(seed=2)(logits, rows).token_ids
    for i, (name, params) in enumerate(FILTER_CASES.items()):
        expected = reference_distribution(SMALL_LOGITS, params)
        observed = empirical(tokens[i * NUM_DRAWS : (i + 1) * NUM_DRAWS], len(SMALL_LOGITS))
        assert all(o == 0 for o, e in zip(observed, expected) if e == 0), f"{name}: excluded token drawn"
        diff = max(abs(o - e) for o, e in zip(observed, expected))
        assert diff < TOLERANCE, f"{name}: observed {observed} vs expected {expected}"


def test_temperature_distribution_is_softmax_over_t():
    for temperature in (0.5, 2.0):
        expected = softmax([v / temperature for v in SMALL_LOGITS])
        rows = [make_row(SamplingParams(temperature=temperature))] * NUM_DRAWS
        logits = torch.tensor([SMALL_LOGITS]).expand(NUM_DRAWS, -1)
        observed = empirical(Sampler(seed=3)(logits, rows).token_ids, len(SMALL_LOGITS))
        assert max(abs(o - e) for o, e in zip(observed, expected)) < TOLERANCE, temperature


def run_steps(sampler: Sampler, batches: list[tuple[torch.Tensor, list[SamplingRow], int]]) -> list[int]:
    """Feeds one batch per step and collects the token of the tracked row (at the given position)."""
    return [sampler(logits, rows).token_ids[position] for logits, rows, position in batches]


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproducible_regardless_of_batch(device):
    vocab, steps = 5000, 20
    flat = torch.zeros(1, vocab, device=device)
    params = SamplingParams(temperature=1.0, seed=1234)

    def alone(seed: int) -> list[int]:
        row = make_row(params, generator=seeded(seed, device))
        return run_steps(Sampler(seed=0), [(flat, [row], 0)] * steps)

    target = make_row(params, generator=seeded(1234, device))
    others = [
        make_row(SamplingParams(temperature=0.8, top_k=50, seed=7), generator=seeded(7, device)),
        make_row(SamplingParams(temperature=1.0)),
        make_row(SamplingParams(temperature=0.0, seed=9), generator=seeded(9, device)),
        make_row(SamplingParams(temperature=1.3, top_p=0.5)),
    ]
    noise = torch.Generator().manual_seed(5)
    batches = []
    for step in range(steps):
        position = step % (len(others) + 1)
        mates = others[: 1 + step % len(others)]
        rows = mates[:position] + [target] + mates[position:]
        position = min(position, len(mates))
        batch_logits = torch.randn(len(rows), vocab, generator=noise).to(device)
        batch_logits[position] = flat[0]
        batches.append((batch_logits, rows, position))
    mixed = run_steps(Sampler(seed=99), batches)

    reference = alone(1234)
    assert mixed == reference
    assert alone(1234) == reference
    assert len(set(reference)) > steps // 2
    assert alone(4321) != reference


def test_shared_generator_follows_sampler_seed():
    logits = torch.zeros(8, 1000)
    rows = [make_row(SamplingParams(temperature=1.0))] * 8
    first = Sampler(seed=3)(logits, rows).token_ids
    assert Sampler(seed=3)(logits, rows).token_ids == first
    assert Sampler(seed=4)(logits, rows).token_ids != first


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax(device):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(4)).to(device)
    raw = logits.log_softmax(-1).cpu()
    ranked = raw.argsort(-1, descending=True).tolist()
    rows = [
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(temperature=0.9, logprobs=0)),
        make_row(SamplingParams(temperature=0.7, logprobs=3, repetition_penalty=2.0), prompt=ranked[2][:5]),
        # The three best tokens are banned, so the chosen token falls outside the top-2.
        make_row(SamplingParams(temperature=0.0, logprobs=2), banned=ranked[3][:3]),
    ]
    out = Sampler()(logits, rows)
    assert out.logprobs[0] is None
    assert out.token_ids[3] == ranked[3][3]
    for i, row in enumerate(rows[1:], start=1):
        n = row.params.logprobs
        entry = out.logprobs[i]
        assert set(entry) == set(ranked[i][:n]) | {out.token_ids[i]}
        for token, value in entry.items():
            assert value == pytest.approx(raw[i, token].item(), abs=1e-5)
    assert len(out.logprobs[3]) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_sample_never_reads_the_device(device, monkeypatch):
    """`Sampler.sample` decides everything from host-side params: no .item()/.tolist()/bool() on a
    tensor (each would wait for the GPU), so a step's tokens can stay on the device (overlap)."""
    vocab = 64
    logits = torch.randn(6, vocab, device=device)
    rows = [
        make_row(SamplingParams(temperature=0)),
        make_row(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)),
        make_row(SamplingParams(temperature=1.0, seed=3), generator=seeded(3, device)),
        make_row(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=[1, 2], output=[3]),
        make_row(SamplingParams(temperature=0.5, frequency_penalty=0.3, presence_penalty=0.2), output=[4, 4]),
        make_row(SamplingParams(temperature=0, logprobs=3), banned=[7]),
    ]

    def forbidden(*args, **kwargs):
        raise AssertionError("the sampler read a tensor's value on the host")

    sampler = Sampler(seed=0)
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, forbidden)
        sampled = sampler.sample(logits, rows)
    tokens = sampled.to_host().token_ids  # reading happens only here
    assert len(tokens) == 6 and all(0 <= t < vocab for t in tokens) and tokens[5] != 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 3, 40])
# a partial last chunk, whole chunks only, less than one chunk
@pytest.mark.parametrize("vocab", [8 * ARGMAX_CHUNK + 517, 8 * ARGMAX_CHUNK, ARGMAX_CHUNK // 2 + 3])
def test_argmax_rows_matches_torch_including_ties(device, rows, vocab):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, vocab, generator=gen)
    x[0, vocab - 3] = 50.0  # the maximum in the partial chunk
    if rows > 1:
        # Ties across chunks and inside one: the first index wins, as in torch.
        x[1, [c % vocab for c in (5, ARGMAX_CHUNK + 7, 3 * ARGMAX_CHUNK, 3 * ARGMAX_CHUNK + 1)]] = 60.0
        x[2, :] = float("-inf")
        x[2, (2 * ARGMAX_CHUNK + 9) % vocab] = -1e30
    x = x.to(device)
    assert argmax_rows(x).tolist() == x.argmax(-1).tolist()
