"""Where a step's CPU time goes on the GPU machine (Llama-3-8B shapes, dummy bf16 weights).

1. The eager forward at batch 1 under torch.profiler: the top ops by CPU time.
2. The engine's phases (schedule, prepare, launch, resolve) with overlap on and off at a given
   concurrency, timed by wrapping the methods.

    python benchmarks/profile_step.py [--concurrency 256]
"""

from __future__ import annotations

import argparse
import collections
import functools
import random
import time

import torch

from tensorjet import LLM, SamplingParams


def timed(obj, name: str, totals: dict) -> None:
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-8B")
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", max_num_tokens=8192)
    vocab = min(128000, llm.engine.source.hf_config.vocab_size)
    rng = random.Random(0)
    prompt = [rng.randrange(vocab) for _ in range(128)]
    runner = llm.engine.runner

    graphs, runner.decode_graphs = runner.decode_graphs, None
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    runner.decode_graphs = graphs

    engine = llm.engine
    totals: dict = collections.defaultdict(float)
    timed(engine.scheduler, "schedule", totals)
    timed(engine, "_launch", totals)
    timed(engine, "_resolve", totals)
    timed(runner, "prepare", totals)
    timed(runner.sampler, "sample", totals)
    timed(runner.model, "forward", totals)
    if runner.decode_graphs is not None:
        timed(runner.decode_graphs, "run", totals)
    prompts = [[rng.randrange(vocab) for _ in range(128)] for _ in range(args.concurrency)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for overlap in (True, False, True):
        engine.overlap = overlap
        totals.clear()
        sync()
        start = time.perf_counter()
        steps = engine.num_steps
        llm.generate(prompts, params, use_tqdm=False)
        sync()
        wall = time.perf_counter() - start
        steps = engine.num_steps - steps
        phases = ", ".join(f"{k} {v * 1e3 / steps:.2f}" for k, v in sorted(totals.items()))
        print(
            f"overlap={overlap}: {wall:.2f}s, {steps} steps, {wall * 1e3 / steps:.2f} ms/step; "
            f"per step ms: {phases}"
        )
    llm.shutdown()


if __name__ == "__main__":
    main()
