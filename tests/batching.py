"""Batch-invariance runs shared by tests: every prompt alone, then all together under a KV pool small
enough that chunking and preemption happen."""

import dataclasses

from greedy import TOP_LOGPROBS, GreedyRun

from tensorjet import LLM, SamplingParams

# A KV pool of 1,024 tokens for dozens of prompts of up to ~130 tokens: chunks of 96, steps of 256, and
# preemption once the pool fills.
TIGHT = dict(
    kv_cache_max_tokens=1024,
    block_size=16,
    max_num_tokens=256,
    max_chunked_prefill_length=96,
    max_batch_size=32,
)


def alone_and_together(
    prompts: list, params: SamplingParams, **tight_options
) -> tuple[list[GreedyRun], list[GreedyRun], dict]:
    """On one fresh CPU engine built with `tight_options`: each prompt's greedy run alone, then all of
    them together, and the engine's stats after the run. Runs carry the top logprobs for a tie-aware
    comparison."""
    params = dataclasses.replace(params, logprobs=TOP_LOGPROBS)
    llm = LLM(device="cpu", **{"dtype": "float32", **tight_options})
    try:
        alone = [GreedyRun.of(llm.generate([p], params, use_tqdm=False)[0].outputs[0]) for p in prompts]
        assert llm.stats()["num_preemptions"] == 0
        together = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
        return alone, together, llm.stats()
    finally:
        llm.shutdown()
