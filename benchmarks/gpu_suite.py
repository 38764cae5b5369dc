"""GPU benchmark suite (H200): decode latency, offline throughput and feature ablations in one run.

Model: Llama-3-8B shapes with random bf16 weights (`load_format="dummy"`), so no download is needed.
Every figure is printed beside its physical limit:
  decode at batch 1 is bound by bytes: (weights + KV read per step) / 4.25 TB/s;
  large-batch work by FLOPs: 2 x params per token / 782 TFLOP/s (bf16 dense).

    python benchmarks/gpu_suite.py --out $OUT/gpu_suite.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

import torch

MODEL = "meta-llama/Meta-Llama-3-8B"
COPY_TBPS = 4.25
BF16_TFLOPS = 782.0


def make_llm(**options):
    from tensorjet import LLM

    base = dict(model=MODEL, load_format="dummy", dtype="bfloat16")
    base.update(options)
    return LLM(**base)


def random_ids(rng: random.Random, n: int, vocab: int = 128000) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def timed_generate(llm, prompts, params) -> tuple[float, list]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, outs


def decode_latency(llm, batch: int, in_len: int = 128, out_len: int = 256) -> dict:
    from tensorjet import SamplingParams

    rng = random.Random(batch)
    prompts = [random_ids(rng, in_len) for _ in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    elapsed, outs = timed_generate(llm, prompts, params)
    ttft = max(o.metrics.first_token_time - o.metrics.arrival_time for o in outs)
    ms_per_step = (elapsed - ttft) / (out_len - 1) * 1e3
    return {
        "batch": batch,
        "ms_per_step": ms_per_step,
        "ttft_ms": ttft * 1e3,
        "output_tok_s": batch * out_len / elapsed,
    }


def throughput(llm, lengths: list[tuple[int, int]], seed: int = 0) -> dict:
    from tensorjet import SamplingParams

    rng = random.Random(seed)
    prompts = [random_ids(rng, i) for i, _ in lengths]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in lengths]
    elapsed, outs = timed_generate(llm, prompts, params)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "requests": len(lengths),
        "seconds": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(i for i, _ in lengths)) / elapsed,
        **llm.stats(),
    }


def shared_prefix(llm, n: int = 64, prefix: int = 1000, suffix: int = 64, out: int = 64) -> dict:
    from tensorjet import SamplingParams

    rng = random.Random(7)
    system = random_ids(rng, prefix)
    prompts = [system + random_ids(rng, suffix) for _ in range(n)]
    params = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)  # the first request fills the cache
    elapsed, outs = timed_generate(llm, prompts[1:], params)
    ttft = sorted(o.metrics.first_token_time - o.metrics.arrival_time for o in outs)
    return {
        "seconds": elapsed,
        "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
        "ttft_p50_ms": ttft[len(ttft) // 2] * 1e3,
        "hit_rate": llm.stats()["prefix_cache_hit_rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--sections", default="latency,throughput,static,prefix")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    results["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows: list[tuple[str, str, str]] = []
    llm = make_llm(max_batch_size=256, max_num_tokens=8192)
    params_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    n_params = sum(p.numel() for p in llm.engine.runner.model.parameters())
    results["weight_bytes"] = params_bytes
    limit_ms = params_bytes / (COPY_TBPS * 1e12) * 1e3
    if "latency" in sections:
        for batch in (1, 8, 64):
            r = decode_latency(llm, batch, out_len=128 if args.quick else 256)
            results[f"decode_b{batch}"] = r
            rows.append(
                (
                    f"decode ms/step, batch {batch}",
                    f"{r['ms_per_step']:.2f}",
                    f"limit {limit_ms:.2f} (weights/4.25TB/s) -> {limit_ms / r['ms_per_step']:.0%}",
                )
            )
    if "throughput" in sections:
        n = 200 if args.quick else 1000
        r = throughput(llm, [(1000, 1000)] * n if not args.quick else [(1000, 200)] * n)
        results["throughput_1000"] = r
        flop_limit = BF16_TFLOPS * 1e12 / (2 * n_params)
        rows.append(
            (
                f"offline {n} req 1000 in",
                f"{r['output_tok_s']:.0f} out tok/s",
                f"total {r['total_tok_s']:.0f} tok/s; FLOP limit {flop_limit:.0f} tok/s",
            )
        )
        rng = random.Random(0)
        mixed = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
        r = throughput(llm, mixed)
        results["throughput_mixed"] = r
        rows.append(
            (
                "offline 256 req 100-1024/100-1024",
                f"{r['output_tok_s']:.0f} out tok/s",
                f"total {r['total_tok_s']:.0f} tok/s",
            )
        )
    if "prefix" in sections:
        on = shared_prefix(llm)
        results["prefix_on"] = on
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    if "prefix" in sections:
        off_llm = make_llm(enable_prefix_caching=False, max_num_tokens=8192)
        off = shared_prefix(off_llm)
        results["prefix_off"] = off
        off_llm.shutdown()
        del off_llm
        torch.cuda.empty_cache()
        rows.append(
            (
                "prefix cache on/off, 1000-tok system",
                f"{off['seconds'] / on['seconds']:.2f}x faster",
                f"TTFT p50 {on['ttft_p50_ms']:.0f} vs {off['ttft_p50_ms']:.0f} ms",
            )
        )
    if "static" in sections:
        rng = random.Random(1)
        mixed = [(rng.randint(16, 512), rng.randint(16, 512)) for _ in range(256)]
        ratios = {}
        for policy in ("max_utilization", "static_batch"):
            pllm = make_llm(scheduler_policy=policy, max_batch_size=64, max_num_tokens=8192)
            ratios[policy] = throughput(pllm, mixed)
            pllm.shutdown()
            del pllm
            torch.cuda.empty_cache()
        results["static_vs_inflight"] = ratios
        speedup = ratios["max_utilization"]["output_tok_s"] / ratios["static_batch"]["output_tok_s"]
        rows.append(("in-flight vs static batching", f"{speedup:.2f}x", "guide claims 4-8x"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{'measurement':<40}{'value':<22}context")
    for name, value, context in rows:
        print(f"{name:<40}{value:<22}{context}")


if __name__ == "__main__":
    main()
