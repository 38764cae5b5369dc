"""The tie-aware comparison of greedy runs (tests/greedy.py) accepts near-ties and nothing else."""

import pytest
from greedy import TOP_LOGPROBS, GreedyRun, divergence
from prompts import PLAIN

from tensorjet import SamplingParams


def test_equal_runs_agree_and_a_run_that_stops_early_does_not():
    lp = [{5: -0.1, 6: -2.0}, {7: -0.5, 8: -1.0}]
    assert divergence(GreedyRun([5, 7], lp), GreedyRun([5, 7], lp)) is None
    assert "stops early" in divergence(GreedyRun([5, 7], lp), GreedyRun([5], lp[:1]))


def test_a_divergence_needs_a_near_tie_on_both_sides():
    a = GreedyRun([1, 2], [{1: -0.1}, {2: -0.69310, 3: -0.69315}])
    b = GreedyRun([1, 3], [{1: -0.1}, {3: -0.69312, 2: -0.69314}])
    assert divergence(a, b, tie_tol=1e-4) is None
    assert divergence(a, b, tie_tol=1e-5) is not None
    # Run B's choice is missing from run A's top logprobs: not a near-tie, whatever B reports.
    far = GreedyRun([1, 4], [{1: -0.1}, {4: -0.5, 2: -0.5}])
    assert "differs" in divergence(a, far)


@pytest.fixture(scope="module")
def real_runs(llm):
    """Greedy runs of the bundled model with the top-2 logprobs of every token."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=TOP_LOGPROBS)
    prompts = [llm.tokenizer.encode(p) for p in PLAIN[:4]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return prompts, [GreedyRun.of(o.outputs[0]) for o in outs]


def _margins(run: GreedyRun) -> list[tuple[float, int, int]]:
    """Per token: (logprob gap to the runner-up, position, runner-up id)."""
    out = []
    for i, (token, entry) in enumerate(zip(run.token_ids, run.logprobs)):
        runner_up, lp = max(((t, v) for t, v in entry.items() if t != token), key=lambda tv: tv[1])
        out.append((entry[token] - lp, i, runner_up))
    return out


def _diverted(llm, prompt: list[int], run: GreedyRun, position: int, token: int) -> GreedyRun:
    """The engine's own run with `token` forced at `position`: its real continuation and logprobs."""
    params = SamplingParams(
        temperature=0,
        max_tokens=len(run.token_ids) - position - 1,
        ignore_eos=True,
        logprobs=TOP_LOGPROBS,
    )
    context = prompt + run.token_ids[:position] + [token]
    rest = GreedyRun.of(llm.generate([context], params, use_tqdm=False)[0].outputs[0])
    return GreedyRun(
        run.token_ids[:position] + [token] + rest.token_ids,
        run.logprobs[: position + 1] + rest.logprobs,
    )


def test_real_near_tie_is_accepted_and_a_wrong_token_is_rejected(llm, real_runs):
    prompts, runs = real_runs
    margins = sorted((m, p, i, r) for p, run in enumerate(runs) for m, i, r in _margins(run))
    # The closest call the model made: diverting there is a near-tie within any bound above its gap.
    gap, p, i, runner_up = margins[0]
    diverted = _diverted(llm, prompts[p], runs[p], i, runner_up)
    assert diverted.token_ids[: i + 1] != runs[p].token_ids[: i + 1]
    assert divergence(runs[p], diverted, tie_tol=gap * 1.01 + 1e-9) is None
    assert divergence(runs[p], diverted, tie_tol=gap * 0.5) is not None
    # A deliberately wrong output: the runner-up where the model was surest. Rejected at the fp32 bound.
    gap, p, i, runner_up = margins[-1]
    assert gap > 1.0
    wrong = _diverted(llm, prompts[p], runs[p], i, runner_up)
    assert f"token {i} differs" in divergence(runs[p], wrong)
