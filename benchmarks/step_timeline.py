"""Where an offline run's wall time goes, step by step, on the GPU (Llama-3-8B shapes, dummy weights).

Each step's device work is bracketed by CUDA events recorded around `ModelRunner.launch`, so the run
splits into
- GPU spans of graphed decode steps (by batch size, in bands of 64) and of eager steps (those with
  prompt tokens, by token count);
- gaps: the device idle between one step's last kernel and the next step's first (host-bound time).
A span includes any idle time inside an eager step whose launches outpace its kernels. NVML samples
the SM clock and board power meanwhile (nvidia-ml-py).

Workloads: the HF peer's (256 requests of 100-1024 in / 256 out) and a 1000 in / 1000 out run.

    python benchmarks/step_timeline.py [--requests_1000 320] [--kv_cache_dtype fp8] [--max_batch_size 512]
(--requests_1000 1000 is the suite's workload: ~100 s per cache dtype.)
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import time

import torch

from tensorjet import LLM, SamplingParams
from tensorjet.bench.gpu_monitor import Sampler, nvml_probes

MODEL = "meta-llama/Meta-Llama-3-8B"


def instrument(runner) -> list[tuple]:
    """Wrap runner.launch to record (start event, end event, graphed, tokens, sequences) per step."""
    steps: list[tuple] = []
    launch = runner.launch

    def timed_launch(batch, prev=None):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        graphed_before = runner.num_graph_steps
        start.record()
        handle = launch(batch, prev)
        end.record()
        steps.append(
            (start, end, runner.num_graph_steps > graphed_before, sum(batch.query_lens), len(batch.seqs))
        )
        return handle

    runner.launch = timed_launch
    return steps


def summarise(steps: list[tuple], wall_s: float) -> dict:
    torch.cuda.synchronize()
    kinds: dict[str, list[float]] = collections.defaultdict(list)
    step_kinds = []
    for start, end, graphed, tokens, num_seqs in steps:
        low = (num_seqs - 1) // 64 * 64
        band = f"{low + 1}-{low + 64}"  # batch sizes 1-64, 65-128, ...
        if graphed:
            kind = f"decode, graphed, {band}"
        elif tokens == num_seqs:
            kind = f"decode, eager, {band}"
        elif tokens < 2048:
            kind = "mixed, < 2048 tokens"
        else:
            kind = "mixed, >= 2048 tokens"
        kinds[kind].append(start.elapsed_time(end))
        step_kinds.append(kind)
    gaps = [end.elapsed_time(after[0]) for (_, end, *_), after in zip(steps, steps[1:])]
    # Which steps the long gaps sit between: "previous -> next" kind.
    transitions: dict[str, list[float]] = collections.defaultdict(list)
    for i, gap in enumerate(gaps):
        if gap > 1.0:
            transitions[f"{step_kinds[i]} -> {step_kinds[i + 1]}"].append(gap)
    spans = sum(sum(v) for v in kinds.values()) / 1e3
    return {
        "wall_s": wall_s,
        "gpu_spans_s": spans,
        "gaps_s": sum(gaps) / 1e3,
        "gaps_over_1ms": sum(1 for g in gaps if g > 1.0),
        "kinds": {
            k: {"steps": len(v), "seconds": sum(v) / 1e3, "min_ms": min(v), "median_ms": statistics.median(v)}
            for k, v in kinds.items()
        },
        "gaps_over_1ms_by_transition": {
            k: {"gaps": len(v), "seconds": sum(v) / 1e3, "longest_ms": max(v)} for k, v in transitions.items()
        },
    }


def run(llm, prompts: list[list[int]], out_lens: list[int]) -> dict:
    runner = llm.engine.runner
    steps = instrument(runner)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    torch.cuda.synchronize()
    start = time.perf_counter()
    # The SM clock and the board power while it runs: whether the power limit held the clock back.
    with Sampler(nvml_probes(runner.device), interval_s=0.05) as sampler:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    result = summarise(steps, time.perf_counter() - start)
    del runner.launch  # back to the class's method
    result["output_tok_s"] = sum(out_lens) / result["wall_s"]
    for key in ("gpu_sm_clock_mhz", "gpu_power_w"):
        samples = sampler.samples.get(key) or [float("nan")]
        result[key] = {"min": min(samples), "mean": sum(samples) / len(samples), "max": max(samples)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests_1000", type=int, default=320)
    parser.add_argument("--kv_cache_dtype", default="auto")
    parser.add_argument("--max_batch_size", type=int, default=256)
    parser.add_argument("--skip_hf", action="store_true", help="only the 1000 in / 1000 out workload")
    parser.add_argument("--hf_runs", type=int, default=1, help="run HF's workload this many times")
    parser.add_argument("--out", default="step_timeline.json")
    args = parser.parse_args()
    llm = LLM(
        model=MODEL, load_format="dummy", dtype="bfloat16", max_batch_size=args.max_batch_size,
        max_num_tokens=8192, kv_cache_dtype=args.kv_cache_dtype,
    )  # fmt: skip
    vocab = 128000
    rng = random.Random(0)
    warm = [[rng.randrange(vocab) for _ in range(rng.randint(16, 1200))] for _ in range(96)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    results = {}
    for i in range(0 if args.skip_hf else args.hf_runs):  # fresh prompts each run: no prefix-cache hits
        hf_prompts = [[rng.randrange(vocab) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
        results["hf_workload" + (f"_{i + 1}" if i else "")] = run(llm, hf_prompts, [256] * 256)
    n = args.requests_1000
    long_prompts = [[rng.randrange(vocab) for _ in range(1000)] for _ in range(n)]
    results[f"{n}x1000"] = run(llm, long_prompts, [1000] * n)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{'workload':<14}{'kind':<32}{'steps':>7}{'seconds':>9}{'ms/step':>9}{'median':>9}{'min':>9}")
    for name, r in results.items():
        for kind, k in sorted(r["kinds"].items()):
            per_step = 1e3 * k["seconds"] / k["steps"]
            print(
                f"{name:<14}{kind:<32}{k['steps']:>7}{k['seconds']:>9.2f}{per_step:>9.2f}"
                f"{k['median_ms']:>9.2f}{k['min_ms']:>9.2f}"
            )
        print(
            f"{name:<14}{'gaps (GPU idle)':<32}{r['gaps_over_1ms']:>7}{r['gaps_s']:>9.2f}"
            f"   (count: gaps over 1 ms)"
        )
        for transition, g in r["gaps_over_1ms_by_transition"].items():
            longest = f"longest {g['longest_ms']:.0f} ms"
            print(f"{name:<14}  gaps {transition}: {g['gaps']}, {g['seconds']:.2f} s, {longest}")
        print(f"{name:<14}{'wall':<32}{'':>7}{r['wall_s']:>9.2f}   {r['output_tok_s']:.0f} out tok/s")
        clock, power = r["gpu_sm_clock_mhz"], r["gpu_power_w"]
        print(
            f"{name:<14}SM clock {clock['min']:.0f}-{clock['max']:.0f} MHz (mean {clock['mean']:.0f}), "
            f"power mean {power['mean']:.0f} W (max {power['max']:.0f})"
        )


if __name__ == "__main__":
    main()
