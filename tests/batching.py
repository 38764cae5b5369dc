"""Batch-invariance runs shared by tests: every prompt alone, then all together under a KV pool small
enough that chunking and preemption happen."""

from tensorjet import LLM, SamplingParams


def alone_and_together(
    llm: LLM, prompts: list, params: SamplingParams, **tight_options
) -> tuple[list[list[int]], list[list[int]], dict]:
    """(tokens of each prompt run alone on `llm`, tokens of all run together on a fresh CPU engine
    built with `tight_options`, that engine's stats after the run)."""
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    tight = LLM(device="cpu", **tight_options)
    try:
        together = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
        return alone, together, tight.stats()
    finally:
        tight.shutdown()
