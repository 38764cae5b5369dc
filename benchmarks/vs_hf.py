"""tensorjet against HF transformers' continuous batching on one workload, in one run: the suite's
comparison with the peer on its own, or on a workload with shorter outputs (the suite's prompts, seeds
and helpers):

- nano-vllm: 256 requests of 100-1,024 tokens in and 100-1,024 out, the one `gpu_suite.py` compares on;
  HF takes about five minutes;
- guide: 256 requests of 100-1,024 in, 256 out (HF measured 542 out tok/s there on the H200).

tensorjet runs first (FP8 KV cache, and the bf16 cache unless --skip_bf16), then HF. HF's progress is
printed as its requests finish and kept in the JSON, so a run cut short still says how fast HF was going.

    python benchmarks/vs_hf.py --workload nano-vllm [--skip_bf16] [--out vs_hf.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from gpu_suite import (  # noqa: E402  (benchmarks/ is on the path)
    FP8_MAX_BATCH,
    build_engine,
    hf_continuous_batching,
    hf_model,
    nano_vllm_workload,
    random_ids,
    release_gpu_memory,
    throughput,
    warm_up,
    workload_prompts,
)


def workload(name: str) -> tuple[list[list[int]], list[int]]:
    """The prompts and output lengths of `name`, as the suite draws them."""
    if name == "guide":
        rng = random.Random(0)
        prompts = [random_ids(rng, rng.randint(100, 1024)) for _ in range(256)]
        return prompts, [256] * len(prompts)
    lengths = nano_vllm_workload()
    return workload_prompts(lengths), [out for _, out in lengths]


def tensorjet_run(prompts: list[list[int]], out_lens: list[int], **options) -> dict:
    llm = build_engine(**options)
    warm_up(llm, seed=97)
    r = throughput(llm, [(len(p), n) for p, n in zip(prompts, out_lens)], prompts=prompts)
    llm.shutdown()
    del llm
    release_gpu_memory()
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=["guide", "nano-vllm"], default="nano-vllm")
    parser.add_argument("--skip_bf16", action="store_true", help="only the FP8 KV cache engine")
    parser.add_argument("--out", default="vs_hf.json")
    args = parser.parse_args()
    prompts, out_lens = workload(args.workload)
    results: dict = {"workload": args.workload, "requests": len(prompts), "output_tokens": sum(out_lens)}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    runs = [("fp8_kv", dict(max_batch_size=FP8_MAX_BATCH, kv_cache_dtype="fp8"))]
    runs += [] if args.skip_bf16 else [("bf16_kv", {})]
    for key, options in runs:
        results[key] = r = tensorjet_run(prompts, out_lens, **options)
        print(f"tensorjet, {key}: {r['output_tok_s']:.0f} out tok/s ({r['seconds']:.1f} s)", flush=True)
        save()

    model = hf_model()
    progress: list[tuple[int, float]] = []

    def report(tokens: int, seconds: float) -> None:
        progress.append((tokens, seconds))
        if len(progress) % 16 == 0:
            print(f"HF: {len(progress)} requests, {tokens} tokens in {seconds:.0f} s", flush=True)
            results["hf_progress"] = progress
            save()

    begin = time.perf_counter()
    results["hf_cb"] = hf = hf_continuous_batching(model, prompts, out_lens, progress=report)
    results["hf_progress"] = progress
    save()
    print(f"HF continuous batching: {hf['output_tok_s']:.0f} out tok/s ({time.perf_counter() - begin:.0f} s)")
    print(f"\n{args.workload} workload, {len(prompts)} requests")
    print(f"{'engine':<28}{'out tok/s':>10}{'vs HF':>8}")
    for name, rate in [(f"tensorjet, {key}", results[key]["output_tok_s"]) for key, _ in runs] + [
        ("HF continuous batching", hf["output_tok_s"])
    ]:
        print(f"{name:<28}{rate:>10.0f}{rate / hf['output_tok_s']:>7.1f}x")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
