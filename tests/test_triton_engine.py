"""The engine with the Triton attention backend (interpreted on CPU) gives the reference backend's
greedy tokens (tie-aware: the kernels round differently) on a ragged, chunked, prefix-cached workload."""

import pytest
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree

from tensorjet import LLM, SamplingParams

pytestmark = pytest.mark.slow  # the whole engine with every kernel interpreted


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_triton_backend_matches_torch_backend(tiny_model_dir, kv_cache_dtype):
    prompts = [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate((5, 40, 17, 33))]
    prompts.append(prompts[1][:32] + [3, 4, 5])  # shares two cached blocks with prompt 1
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=TOP_LOGPROBS)
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            model=tiny_model_dir,
            device="cpu",
            attention_backend=backend,
            max_num_tokens=24,
            max_chunked_prefill_length=16,
            kv_cache_dtype=kv_cache_dtype,
        )
        assert llm.engine.runner.attention_backend == backend
        llm.generate(prompts[1], params, use_tqdm=False)  # fill the prefix cache
        results[backend] = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.stats()["prefix_cache_hits_tokens"] > 0 and llm.stats()["num_partial_prefills"] > 0
        llm.shutdown()
    assert_all_agree(results["triton"], results["torch"], what="triton vs torch backend")
