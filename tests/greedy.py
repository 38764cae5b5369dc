"""Whether two greedy runs of one prompt agree, allowing for near-ties that rounding may flip.

Two runs whose arithmetic differs (another batch shape, kernel, library or machine) round their logits
differently in the last bits, so where the top two tokens are within a few ulps of each other either
may win. Such runs *agree* when their tokens are equal, or when at the first token where they differ
each run ranked the other's token within `tie_tol` (log-probability) of its own. After a divergence the
two continue from different contexts, so the comparison stops there. A real defect (a wrong kernel, a
stale cache row) shows as a divergence with a large gap and fails.

Runs of the identical computation (the same engine, batch and options) must stay token-exact: compare
those with `==`, not with this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# fp32 logits of the bundled model differ by up to ~1e-5 between batch shapes and libraries; a gap below
# this bound is a near-tie, one above it is a real difference.
TIE_TOL_FP32 = 1e-4
# Enough top logprobs per token to see the other run's choice at a near-tie (the runner-up).
TOP_LOGPROBS = 2


@dataclass
class GreedyRun:
    """One greedy completion: its tokens and, per token, {token id: logprob} of at least the top two."""

    token_ids: list[int]
    logprobs: list[dict[int, float]]

    @classmethod
    def of(cls, completion) -> GreedyRun:
        """From an engine `CompletionOutput` generated with `logprobs >= TOP_LOGPROBS`."""
        if completion.logprobs is None:
            raise ValueError("the completion carries no logprobs: generate with SamplingParams(logprobs=2)")
        return cls(list(completion.token_ids), list(completion.logprobs))


def divergence(a: GreedyRun, b: GreedyRun, tie_tol: float = TIE_TOL_FP32) -> str | None:
    """None if the runs agree (equal, or first differing at a near-tie); else why they do not."""
    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        if x == y:
            continue
        gap_a = a.logprobs[i][x] - a.logprobs[i].get(y, -math.inf)
        gap_b = b.logprobs[i][y] - b.logprobs[i].get(x, -math.inf)
        if gap_a <= tie_tol and gap_b <= tie_tol:
            return None
        return (
            f"token {i} differs: {x} vs {y}; run A ranks {y} {gap_a:.3g} below its choice, run B ranks {x} "
            f"{gap_b:.3g} below its choice (a near-tie is within {tie_tol:g})"
        )
    if len(a.token_ids) != len(b.token_ids):
        return f"equal for {min(len(a.token_ids), len(b.token_ids))} tokens, then one run stops early"
    return None


def assert_greedy_agree(a: GreedyRun, b: GreedyRun, tie_tol: float = TIE_TOL_FP32, what: str = "") -> None:
    reason = divergence(a, b, tie_tol)
    assert reason is None, f"{what}: {reason}" if what else reason


def assert_all_agree(
    runs_a: list[GreedyRun], runs_b: list[GreedyRun], tie_tol: float = TIE_TOL_FP32, what: str = ""
) -> None:
    assert len(runs_a) == len(runs_b)
    reasons = [(i, divergence(a, b, tie_tol)) for i, (a, b) in enumerate(zip(runs_a, runs_b))]
    failed = [f"prompt {i}: {r}" for i, r in reasons if r is not None]
    assert not failed, f"{what}: " + "; ".join(failed)


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int) -> GreedyRun:
    """HF transformers' greedy completion with the top logprobs of its raw logits at each step."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = []
    for step_logits, token in zip(out.logits, tokens):
        lp = step_logits[0].float().log_softmax(-1)
        top = lp.topk(TOP_LOGPROBS)
        entry = dict(zip(top.indices.tolist(), top.values.tolist()))
        entry[token] = lp[token].item()
        logprobs.append(entry)
    return GreedyRun(tokens, logprobs)
