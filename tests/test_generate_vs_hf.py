"""Greedy tokens agree with HF transformers', and never depend on batching.

HF's kernels and ours (and ours at different batch shapes) round differently, so these comparisons are
tie-aware (tests/greedy.py); with `batch_invariant=True` the engine's own runs are equal bit for bit."""

import dataclasses

import pytest
from batching import TIGHT, alone_and_together
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree, hf_greedy
from prompts import CHAT, PLAIN, varied_prompts

from tensorjet import SamplingParams

pytestmark = pytest.mark.slow  # every test runs the bundled model, most of them twice

NEW_TOKENS = 48
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=TOP_LOGPROBS)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    plain = [llm.tokenizer.encode(p) for p in PLAIN]
    chat = [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    return plain + chat


@pytest.fixture(scope="module")
def hf_runs(hf_model, prompt_ids, llm):
    eos = llm.tokenizer.eos_token_id
    return [hf_greedy(hf_model, ids, NEW_TOKENS, eos) for ids in prompt_ids]


def test_greedy_matches_hf_one_at_a_time(llm, prompt_ids, hf_runs):
    assert len(prompt_ids) >= 12
    ours = [GreedyRun.of(llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0]) for ids in prompt_ids]
    assert_all_agree(ours, hf_runs, what="one at a time vs HF")


def test_greedy_matches_hf_all_in_one_batch(llm, prompt_ids, hf_runs):
    outs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert_all_agree([GreedyRun.of(o.outputs[0]) for o in outs], hf_runs, what="one batch vs HF")
    for out in outs:
        tokens = out.outputs[0].token_ids
        assert out.outputs[0].text == llm.tokenizer.decode(tokens, skip_special_tokens=True)
        assert out.outputs[0].finish_reason == (
            "stop" if tokens[-1] == llm.tokenizer.eos_token_id else "length"
        )


def _check_tight_run(stats):
    assert stats["num_preemptions"] > 0, stats
    assert stats["num_partial_prefills"] > 0, stats
    assert stats["kv_blocks_used"] == 0, "blocks leaked"


def test_batch_invariance_under_chunking_and_preemption():
    """24 mixed-length requests through a KV pool far too small for all of them at once."""
    prompts = varied_prompts(24, seed=3, max_words=90)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone, together, stats = alone_and_together(prompts, params, **TIGHT)
    assert_all_agree(together, alone, what="together vs alone")
    _check_tight_run(stats)


def test_batch_invariant_mode_is_exact_alone_batched_and_preempted(prompt_ids):
    """With batch_invariant=True a prompt's greedy tokens are the same, exactly, alone, in a batch of 22
    and when preempted and recomputed."""
    prompts = prompt_ids + varied_prompts(10, seed=3, max_words=60)
    params = dataclasses.replace(GREEDY, max_tokens=12, ignore_eos=True)
    tight = TIGHT | dict(kv_cache_max_tokens=512, max_num_tokens=128, max_chunked_prefill_length=48)
    alone, together, stats = alone_and_together(prompts, params, batch_invariant=True, **tight)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    _check_tight_run(stats)
