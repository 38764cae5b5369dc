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

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B"
MODEL = DEFAULT_MODEL
BACKEND: dict = {}
VOCAB = [128000]  # random prompt ids stay below the model's vocabulary
COPY_TBPS = 4.25
BF16_TFLOPS = 782.0


def make_llm(**options):
    from tensorjet import LLM

    base = dict(model=MODEL, load_format="dummy", dtype="bfloat16", **BACKEND)
    base.update(options)
    return LLM(**base)


def random_ids(rng: random.Random, n: int, vocab: int = 128000) -> list[int]:
    return [rng.randrange(100, min(vocab, VOCAB[0])) for _ in range(n)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed_generate(llm, prompts, params) -> tuple[float, list]:
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    return time.perf_counter() - start, outs


def hf_decode_latency(model_name: str, new_tokens: int = 32) -> float:
    """The peer: HF transformers `generate`, batch 1, same shapes, random bf16 weights (ms/token)."""
    from transformers import AutoModelForCausalLM

    from tensorjet.models.loader import resolve_model

    config = resolve_model(model_name, load_format="dummy").hf_config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(100, 1000, (1, 128), device=device)
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, **{**kwargs, "min_new_tokens": 4})
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **{**kwargs, "min_new_tokens": 1})
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, **kwargs)
        sync()
        total = time.perf_counter() - start
    del model
    free_memory()
    return (total - prefill) / (new_tokens - 1) * 1e3


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
    global MODEL
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--sections", default="peer,latency,throughput,static,prefix")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--attention_backend", default="auto")
    args = parser.parse_args()
    MODEL = args.model
    BACKEND["attention_backend"] = args.attention_backend
    sections = set(args.sections.split(","))
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    results["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows: list[tuple[str, str, str]] = []

    def record(row: tuple[str, str, str]) -> None:
        """Keep each figure as soon as it exists, so a run cut short still reports what it measured."""
        rows.append(row)
        print(" | ".join(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    if "peer" in sections:
        results["hf_decode_b1_ms"] = hf_ms = hf_decode_latency(MODEL)
        record(("HF transformers decode ms/token, batch 1", f"{hf_ms:.2f}", "the peer, same run"))
    llm = make_llm(max_batch_size=256, max_num_tokens=8192)
    VOCAB[0] = llm.engine.source.hf_config.vocab_size
    params_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    n_params = sum(p.numel() for p in llm.engine.runner.model.parameters())
    results["weight_bytes"] = params_bytes
    limit_ms = params_bytes / (COPY_TBPS * 1e12) * 1e3
    if "latency" in sections:
        for batch in (1, 8, 64):
            r = decode_latency(llm, batch, out_len=128 if args.quick else 256)
            results[f"decode_b{batch}"] = r
            record(
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
        record(
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
        record(
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
    free_memory()
    if "prefix" in sections:
        off_llm = make_llm(enable_prefix_caching=False, max_num_tokens=8192)
        off = shared_prefix(off_llm)
        results["prefix_off"] = off
        off_llm.shutdown()
        del off_llm
        free_memory()
        record(
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
            free_memory()
        results["static_vs_inflight"] = ratios
        speedup = ratios["max_utilization"]["output_tok_s"] / ratios["static_batch"]["output_tok_s"]
        record(("in-flight vs static batching", f"{speedup:.2f}x", "guide claims 4-8x"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{'measurement':<44}{'value':<22}context")
    for name, value, context in rows:
        print(f"{name:<44}{value:<22}{context}")


if __name__ == "__main__":
    main()
