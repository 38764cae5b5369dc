"""Speculative decoding with the bundled model (SmolLM2-135M, fp32 on the CPU): greedy output equals
non-speculative greedy output over the reference prompts, with the bundled model as its own draft and with
n-gram lookups, alone, batched and under a KV pool small enough to preempt; no KV block is left in use.

Batch-invariant mode makes every row's arithmetic independent of its step, so the comparison is token for
token. In the default mode a verify row's logits may differ from a decode row's in the last bits, so that
run is compared tie-aware (`tests/greedy.py`)."""

from __future__ import annotations

import pytest
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree
from prompts import PLAIN

from tensorjet import LLM, SamplingParams

pytestmark = pytest.mark.slow  # the bundled model, several engines

PROMPTS = PLAIN
PARAMS = SamplingParams(max_tokens=24, temperature=0.0)
# Ten blocks of 16 tokens for six sequences of ~35 tokens each: preemption, and drafts without free blocks.
TIGHT = dict(kv_cache_max_tokens=160, block_size=16, max_num_tokens=128)


def speculation(method: str, gguf_path) -> dict:
    if method == "ngram":
        return dict(speculative_model="[ngram]", prompt_lookup_min=1)
    return dict(speculative_model=str(gguf_path), num_speculative_tokens=4)


def texts_and_tokens(outs) -> list[tuple[str, list[int], str | None]]:
    return [(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


@pytest.fixture(scope="module")
def plain():
    llm = LLM(device="cpu", dtype="float32", batch_invariant=True)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("method", ["draft_is_target", "ngram"])
def test_greedy_speculation_equals_plain_greedy_alone_batched_and_preempted(method, gguf_path, plain):
    reference = texts_and_tokens(plain.generate(PROMPTS, PARAMS, use_tqdm=False))
    llm = LLM(device="cpu", dtype="float32", batch_invariant=True, **speculation(method, gguf_path), **TIGHT)
    try:
        alone = [texts_and_tokens(llm.generate([p], PARAMS, use_tqdm=False))[0] for p in PROMPTS[:2]]
        assert alone == reference[:2]
        assert texts_and_tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == reference
        stats = llm.stats()
        if method == "draft_is_target":
            # A stop string from the middle of an output: the run stops where the plain run does.
            text = reference[1][0]
            stop = SamplingParams(max_tokens=24, temperature=0.0, stop=[text[len(text) // 2 :][:6]])
            expected = texts_and_tokens(plain.generate(PROMPTS[:3], stop, use_tqdm=False))
            assert expected[1][2] == "stop" and len(expected[1][1]) < len(reference[1][1])
            assert texts_and_tokens(llm.generate(PROMPTS[:3], stop, use_tqdm=False)) == expected
        assert llm.stats()["kv_blocks_used"] == 0
        llm.engine.block_manager.check_integrity([])
    finally:
        llm.shutdown()
    assert stats["num_preemptions"] > 0 and stats["speculative_accepted_tokens"] > 0
    if method == "draft_is_target":
        assert stats["speculative_acceptance_rate"] == 1.0


def test_default_numerics_agree_with_plain_greedy_up_to_near_ties(gguf_path):
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=TOP_LOGPROBS)
    runs = {}
    for name, options in (("plain", {}), ("speculative", speculation("draft_is_target", gguf_path))):
        llm = LLM(device="cpu", dtype="float32", **options)
        try:
            runs[name] = [
                GreedyRun.of(o.outputs[0]) for o in llm.generate(PROMPTS[:4], params, use_tqdm=False)
            ]
            if options:
                assert llm.stats()["speculative_acceptance_rate"] > 0.9
        finally:
            llm.shutdown()
    assert_all_agree(runs["speculative"], runs["plain"], what="speculative vs plain greedy")
