"""kv_cache_dtype="fp8": an E4M3 KV cache (a quarter of fp32's bytes, half of bf16's), read back as the
model dtype. Kernel-level checks are in test_kernels.py; these run the whole engine on the CPU."""

import pytest
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree
from prompts import CHAT, PLAIN

from tensorjet import LLM, SamplingParams


@pytest.mark.slow  # two engines, each allocating the whole CPU KV budget
def test_fp8_cache_holds_four_times_the_fp32_tokens_in_the_same_bytes(tiny_model_dir):
    totals = {}
    for kv in ("auto", "fp8"):
        llm = LLM(model=tiny_model_dir, device="cpu", kv_cache_dtype=kv)
        totals[kv] = llm.stats()["kv_blocks_total"]
        assert llm.stats()["kv_cache_dtype"] == ("float32" if kv == "auto" else "float8_e4m3fn")
        llm.shutdown()
    assert totals["fp8"] == 4 * totals["auto"]


@pytest.mark.slow  # the engine end to end, converting every K/V to FP8 and back
def test_fp8_prefix_cache_hits_give_the_tokens_of_a_fresh_prompt(tiny_model_dir):
    """A fresh prompt attends to its keys as the cache stores them, so reading them back later (a
    prefix-cache hit) changes nothing."""
    prompts = [[(5 * i + j) % 128 for j in range(n)] for i, n in enumerate((40, 37, 70))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=TOP_LOGPROBS)
    llm = LLM(model=tiny_model_dir, device="cpu", kv_cache_dtype="fp8")
    first = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
    again = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.stats()["prefix_cache_hits_tokens"] >= 3 * 32
    assert_all_agree(again, first, what="prefix-cache hits vs fresh")
    llm.shutdown()


def test_fp8_greedy_tokens_stay_close_to_full_precision(llm):
    """SmolLM2 with an FP8 cache starts the same greedy answer as with the fp32 cache on most prompts
    (E4M3 keeps 3 mantissa bits, so long continuations may drift; broken quantization would not
    agree at all)."""
    ids = [llm.tokenizer.encode(p) for p in PLAIN]
    ids += [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    params = SamplingParams(temperature=0, max_tokens=4)
    full = [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]
    fp8_llm = LLM(device="cpu", kv_cache_dtype="fp8")
    fp8 = [o.outputs[0].token_ids for o in fp8_llm.generate(ids, params, use_tqdm=False)]
    fp8_llm.shutdown()
    agree = sum(a == b for a, b in zip(full, fp8))
    assert agree >= 8, f"only {agree}/12 prompts start alike: {full} vs {fp8}"


@pytest.mark.parametrize("value", ["int8", "fp16", "e5m2"])
def test_unknown_kv_cache_dtype_names_the_field(value):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(device="cpu", kv_cache_dtype=value)
