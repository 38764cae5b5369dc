"""Verifying drafts: the tokens a verify step keeps follow the target's distribution exactly (rejection
sampling), greedy verification is greedy decoding, seeded sequences reproduce, nothing reads the device.

The distribution tests draw many sequences of one step at once: every sequence has the same target rows
(so the target's distribution at each position is known) and its own drafts, drawn from a distribution
that differs from the target's. A chi-square test per position compares the kept tokens with the target's
distribution; a deliberately wrong acceptance rule must fail the same test.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tensorjet.runtime import rejection_sampler
from tensorjet.runtime.rejection_sampler import RejectionSampler
from tensorjet.runtime.sampler import Sampler, SamplingRow, filtered_probs
from tensorjet.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB, K, TRIALS = 8, 3, 30_000
Z_ONE_IN_10K = 3.719  # standard normal quantile of 1 - 1e-4


def row(params: SamplingParams, generator: torch.Generator | None = None) -> SamplingRow:
    return SamplingRow(params, generator, [], [], [])


def chi_square(tokens: list[int], probs: list[float]) -> tuple[float, float]:
    """(Pearson's statistic of `tokens` against `probs`, its 1e-4 critical value). Tokens of probability 0
    must not occur (the statistic is infinite if one does)."""
    counts = Counter(tokens)
    if any(counts[t] for t, p in enumerate(probs) if p == 0):
        return math.inf, 0.0
    n = len(tokens)
    cells = [(counts[t], n * p) for t, p in enumerate(probs) if p > 0]
    statistic = sum((observed - expected) ** 2 / expected for observed, expected in cells)
    df = len(cells) - 1
    # Wilson-Hilferty: the chi-square quantile through a normal one.
    critical = df * (1 - 2 / (9 * df) + Z_ONE_IN_10K * math.sqrt(2 / (9 * df))) ** 3
    return statistic, critical


def target_logits(seed: int) -> torch.Tensor:
    """K + 1 rows of distinct logits: the target's at each position (the same for every sequence)."""
    return torch.randn(K + 1, VOCAB, generator=torch.Generator().manual_seed(seed)) * 1.5


def verify_trials(params: SamplingParams, draft: str, device: str, seed: int = 0):
    """TRIALS sequences of K drafts each through one verify call. draft: 'model' (drafts drawn from a
    distribution unlike the target's: the target at temperature 2 with perturbed logits) or 'lookup'
    (fixed drafts without a distribution, as n-gram proposals are). Returns the kept tokens per sequence
    and the target's distribution at each position."""
    logits = target_logits(seed).to(device)
    rows = [row(params)] * TRIALS
    p = filtered_probs(logits, [row(params)] * (K + 1)).cpu()
    gen = torch.Generator().manual_seed(seed + 1)
    if draft == "model":
        q = (logits.cpu()[:K] / 2.0 + torch.randn(K, VOCAB, generator=gen)).softmax(-1)
        drafts = torch.multinomial(q, TRIALS, replacement=True, generator=gen).T.contiguous()  # [TRIALS, K]
        draft_probs = q.repeat(TRIALS, 1).to(device)
    else:
        drafts = torch.randint(0, VOCAB, (TRIALS, K), generator=gen)
        draft_probs = None
    verifier = RejectionSampler(Sampler(seed=seed + 2))
    out = verifier.verify(
        logits.repeat(TRIALS, 1), rows, [K] * TRIALS, drafts.view(-1).to(device), draft_probs
    ).to_host()
    return out.token_ids, p


def worst_position(kept: list[list[int]], p: torch.Tensor) -> tuple[float, float, int]:
    """The position whose kept tokens fit the target's distribution worst: (statistic, critical value,
    position). Position i counts the sequences that kept i drafts or more (their first i tokens are
    drafts, so the token at i has the target's distribution there)."""
    results = []
    for i in range(K + 1):
        tokens = [t[i] for t in kept if len(t) > i]
        if len(tokens) >= 2000:  # enough for the test to see a wrong rule
            statistic, critical = chi_square(tokens, p[i].tolist())
            results.append((statistic / critical, statistic, critical, i))
    assert len(results) >= 2, "too few sequences kept a draft to test a position past the first"
    _, statistic, critical, position = max(results)
    return statistic, critical, position


CASES = {
    "temperature_1": SamplingParams(temperature=1.0),
    "temperature_top_k_top_p": SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
    "min_p": SamplingParams(temperature=1.3, min_p=0.05),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("draft", ["model", "lookup"])
@pytest.mark.parametrize("case", list(CASES))
def test_kept_tokens_follow_the_target_distribution(case, draft, device):
    kept, p = verify_trials(CASES[case], draft, device)
    lengths = Counter(len(t) for t in kept)
    assert lengths[1] > 0 and lengths[K + 1] > 0, f"both rejections and full acceptance must occur: {lengths}"
    statistic, critical, position = worst_position(kept, p)
    assert statistic < critical, f"{case}, {draft} drafts: position {position} chi-square {statistic:.1f}"


@pytest.mark.parametrize(
    "wrong_rule",
    [
        pytest.param(lambda u, p, q: u < p, id="ignores_the_draft_probability"),
        pytest.param(lambda u, p, q: u * p < q, id="p_and_q_swapped"),
    ],
)
def test_a_wrong_acceptance_rule_fails_the_distribution_test(wrong_rule, monkeypatch):
    """The same statistical test catches an acceptance rule that is not min(1, p/q)."""
    monkeypatch.setattr(rejection_sampler, "accepts", wrong_rule)
    kept, p = verify_trials(CASES["temperature_1"], "model", "cpu")
    statistic, critical, position = worst_position(kept, p)
    assert statistic > critical, f"a wrong rule passed: position {position} chi-square {statistic:.1f}"


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_keeps_drafts_while_they_are_the_argmax(device):
    """Per sequence: drafts equal to the argmax at their row are kept up to the first that is not; the
    token after them is the argmax of its row. Sequences of 0, 1 and 3 drafts share the step, with a
    non-greedy one between them; banned tokens count as for the sampler."""
    gen = torch.Generator().manual_seed(3)
    num_drafts = [3, 0, 1, 3, 2]
    logits = torch.randn(sum(num_drafts) + len(num_drafts), VOCAB, generator=gen)
    argmax = logits.argmax(-1).tolist()
    greedy, banned = (
        SamplingParams(temperature=0),
        SamplingRow(SamplingParams(temperature=0), None, [], [], []),
    )
    rows = [row(greedy), row(greedy), row(SamplingParams(temperature=1.0)), row(greedy), banned]
    banned.banned_token_ids = [argmax[-1]]  # the last sequence's last row must take its second best
    # Sequence 0 keeps all 3, sequence 2's draft is whatever, sequence 3 keeps 1 of 3, sequence 4 keeps 2.
    starts = [0, 4, 5, 7, 11]
    drafts = argmax[0:3] + argmax[5:6] + [argmax[7], (argmax[8] + 1) % VOCAB, argmax[9]] + argmax[11:13]
    out = (
        RejectionSampler(Sampler())
        .verify(logits.to(device), rows, num_drafts, torch.tensor(drafts, device=device))
        .to_host()
    )
    assert out.token_ids[0] == argmax[0:4]
    assert out.token_ids[1] == [argmax[4]]
    assert out.token_ids[3] == [argmax[7], argmax[8]]
    second_best = logits[starts[4] + 2].topk(2).indices[1].item()
    assert out.token_ids[4] == argmax[11:13] + [second_best]
    assert 1 <= len(out.token_ids[2]) <= 2


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_raw_target_logprobs_of_each_kept_token(device):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, VOCAB, generator=gen).to(device)
    argmax = logits.argmax(-1).tolist()
    params = SamplingParams(temperature=0, logprobs=2)
    out = (
        RejectionSampler(Sampler())
        .verify(
            logits, [row(params)], [3], torch.tensor(argmax[:2] + [(argmax[2] + 1) % VOCAB], device=device)
        )
        .to_host()
    )
    raw = logits.log_softmax(-1).cpu()
    assert out.token_ids == [argmax[:3]]
    (entries,) = out.logprobs
    for i, (token, entry) in enumerate(zip(out.token_ids[0], entries)):
        assert set(entry) == set(raw[i].topk(2).indices.tolist()) | {token}
        assert all(value == pytest.approx(raw[i, t].item(), abs=1e-5) for t, value in entry.items())


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_sequence_keeps_the_same_tokens_whatever_its_batch(device):
    vocab = 500
    params = SamplingParams(temperature=1.0, top_k=50, seed=11)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, vocab, generator=gen).to(device)
    q = torch.randn(2, vocab, generator=gen).softmax(-1).to(device)
    drafts = logits[:2].argmax(-1)

    def run(mates: int) -> list[int]:
        seeded = row(params, torch.Generator(device).manual_seed(11))
        others = [row(SamplingParams(temperature=0.9)) for _ in range(mates)]
        noise = torch.randn(3 * mates, vocab, generator=gen).to(device)
        all_logits = torch.cat([noise[: 3 * (mates // 2)], logits, noise[3 * (mates // 2) :]])
        position = mates // 2
        rows = others[:position] + [seeded] + others[position:]
        draft_tokens = torch.cat([drafts] * (mates + 1))
        draft_probs = torch.cat([q] * (mates + 1))
        verifier = RejectionSampler(Sampler(seed=mates))
        out = verifier.verify(all_logits, rows, [2] * (mates + 1), draft_tokens, draft_probs).to_host()
        return out.token_ids[position]

    alone = run(0)
    assert run(3) == alone and run(6) == alone


@pytest.mark.parametrize("device", DEVICES)
def test_verify_never_reads_the_device(device, monkeypatch):
    """Like `Sampler.sample`, verification queues its work without waiting for the device."""
    gen = torch.Generator().manual_seed(6)
    num_drafts = [2, 0, 3]
    logits = torch.randn(8, 64, generator=gen).to(device)
    rows = [
        row(SamplingParams(temperature=0, logprobs=1)),
        row(SamplingParams(temperature=0.8, top_p=0.9)),
        row(SamplingParams(temperature=1.0, seed=2), torch.Generator(device).manual_seed(2)),
    ]
    drafts = torch.randint(0, 64, (5,), generator=gen).to(device)
    draft_probs = torch.rand(5, 64, generator=gen).to(device)
    verifier = RejectionSampler(Sampler())

    def forbidden(*args, **kwargs):
        raise AssertionError("verification read a tensor's value on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, forbidden)
        verified = verifier.verify(logits, rows, num_drafts, drafts, draft_probs)
    out = verified.to_host()
    assert [1 <= len(t) <= m + 1 for t, m in zip(out.token_ids, num_drafts)] == [True] * 3


def test_fixed_acceptance_keeps_the_chosen_share_of_drafts():
    """The benchmark-only mode: each draft is kept with the given probability, whatever the logits."""
    trials, k, rate = 4000, 5, 0.7
    logits = torch.randn(trials * (k + 1), VOCAB, generator=torch.Generator().manual_seed(7))
    verifier = RejectionSampler(Sampler(seed=1))
    verifier.fixed_acceptance = rate
    drafts = torch.randint(0, VOCAB, (trials * k,))
    rows = [row(SamplingParams(temperature=0))] * trials
    out = verifier.verify(logits, rows, [k] * trials, drafts).to_host()
    mean_tokens = sum(len(t) for t in out.token_ids) / trials
    expected = (1 - rate ** (k + 1)) / (1 - rate)  # E[tokens per step] with independent acceptances
    assert mean_tokens == pytest.approx(expected, rel=0.03)
