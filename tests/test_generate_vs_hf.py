"""Acceptance 2 and 3: greedy tokens equal HF transformers', and never depend on batching."""

import pytest
import torch
from batching import alone_and_together
from prompts import CHAT, PLAIN, varied_prompts

from tensorjet import SamplingParams

NEW_TOKENS = 48


@pytest.fixture(scope="module")
def prompt_ids(llm):
    plain = [llm.tokenizer.encode(p) for p in PLAIN]
    chat = [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    return plain + chat


@pytest.fixture(scope="module")
def hf_tokens(hf_model, prompt_ids, llm):
    eos = llm.tokenizer.eos_token_id
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            gen = hf_model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            outs.append(gen[0, len(ids) :].tolist())
    return outs


def test_greedy_matches_hf_one_at_a_time(llm, prompt_ids, hf_tokens):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    assert len(prompt_ids) >= 12
    for ids, expected in zip(prompt_ids, hf_tokens):
        (out,) = llm.generate([ids], params, use_tqdm=False)
        assert out.outputs[0].token_ids == expected


def test_greedy_matches_hf_all_in_one_batch(llm, prompt_ids, hf_tokens):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    outs = llm.generate(prompt_ids, params, use_tqdm=False)
    for out, expected in zip(outs, hf_tokens):
        assert out.outputs[0].token_ids == expected
        text = llm.tokenizer.decode(expected, skip_special_tokens=True)
        assert out.outputs[0].text == text
        assert out.outputs[0].finish_reason == (
            "stop" if expected[-1] == llm.tokenizer.eos_token_id else "length"
        )


def test_batch_invariance_under_chunking_and_preemption(llm):
    """64 mixed-length requests through a KV pool far too small for all of them at once."""
    prompts = varied_prompts(64, seed=3, max_words=90)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone, together, stats = alone_and_together(
        llm,
        prompts,
        params,
        kv_cache_max_tokens=1024,
        block_size=16,
        max_num_tokens=256,
        max_chunked_prefill_length=96,
        max_batch_size=32,
    )
    assert together == alone
    assert stats["num_preemptions"] > 0, stats
    assert stats["num_partial_prefills"] > 0, stats
    assert stats["kv_blocks_used"] == 0, "blocks leaked"
