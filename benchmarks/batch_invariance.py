"""Batch-invariant mode (`batch_invariant=True`): is it exact, and what does it cost? One run.

1. Exactness: the test suite's reference prompts (tests/prompts.py: the 12 plain and chat prompts plus
   52 varied ones) on the bundled SmolLM2-135M (or --model), greedy, 16 tokens: each prompt alone, then
   all 64 together through a KV pool small enough that prompts are chunked and sequences preempted. With
   the mode on the two must be identical; with it off the run reports how many prompts differ (near-ties
   that another batch shape rounds the other way). On a GPU this runs in bf16 with the CUDA defaults
   (Triton kernels, CUDA graphs, overlap scheduling).
2. Cost: the same workloads with the mode on and off. On a GPU: Llama-3-8B shapes with random bf16 weights,
   batch-1 decode latency and 256 requests of 128 in / 256 out. On the CPU: the bundled model, batch-1
   decode and 32 requests of 64 out.

    python benchmarks/batch_invariance.py [--model PATH] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batching import TIGHT  # noqa: E402
from gpu_suite import build_engine, decode_latency, release_gpu_memory, set_model, throughput  # noqa: E402
from prompts import CHAT, PLAIN, varied_prompts  # noqa: E402

from tensorjet import LLM, SamplingParams  # noqa: E402


def exactness(model: str | None, batch_invariant: bool) -> dict:
    """Tokens of each reference prompt alone vs all of them together under chunking and preemption."""
    llm = LLM(model=model, batch_invariant=batch_invariant, **TIGHT)
    try:
        prompts = [llm.tokenizer.encode(p) for p in PLAIN]
        prompts += [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
        prompts += varied_prompts(52, seed=3, max_words=90)
        params = greedy(16)
        alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.stats()
    finally:
        llm.shutdown()
    return {
        "batch_invariant": batch_invariant,
        "dtype": str(llm.config.torch_dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "prompts_differing": sum(a != b for a, b in zip(alone, together)),
        "preemptions": stats["num_preemptions"],
        "partial_prefills": stats["num_partial_prefills"],
        "graph_steps": stats["num_graph_steps"] + stats["num_mixed_graph_steps"],
    }


def cost_gpu(batch_invariant: bool) -> dict:
    llm = build_engine(max_batch_size=256, batch_invariant=batch_invariant)
    try:
        b1 = decode_latency(llm, 1)
        offline = throughput(llm, [(128, 256)] * 256)
    finally:
        llm.shutdown()
        del llm
        release_gpu_memory()
    return {"batch1_ms_per_token": b1["ms_per_step"], "offline_out_tok_s": offline["output_tok_s"]}


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)


def cost_cpu(model: str | None, batch_invariant: bool) -> dict:
    llm = LLM(model=model, batch_invariant=batch_invariant)
    try:
        prompts = varied_prompts(32, seed=1, max_words=40)
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        llm.generate(
            prompts[:1], SamplingParams(temperature=0, max_tokens=33, ignore_eos=True), use_tqdm=False
        )
        single = time.perf_counter() - start
        start = time.perf_counter()
        outs = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False
        )
        batched = time.perf_counter() - start
    finally:
        llm.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"batch1_ms_per_token": single / 33 * 1e3, "offline_out_tok_s": tokens / batched}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model for the exactness check (default: bundled)")
    parser.add_argument("--out", default="benchmarks/results/batch_invariance.json")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else "CPU"
    result: dict = {"device": device, "exactness": [], "cost": {}}
    for mode in (True, False):
        result["exactness"].append(exactness(args.model, mode))
    if gpu:
        set_model("meta-llama/Meta-Llama-3-8B")
    for mode in (False, True):
        result["cost"][str(mode)] = cost_gpu(mode) if gpu else cost_cpu(args.model, mode)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"\nbatch-invariant mode on {device}")
    print(
        "| batch_invariant | dtype | prompts differing alone vs together | preemptions | partial prefills |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in result["exactness"]:
        print(
            f"| {r['batch_invariant']} | {r['dtype']} | {r['prompts_differing']} / {r['prompts']} | "
            f"{r['preemptions']} | {r['partial_prefills']} |"
        )
    off, on = result["cost"]["False"], result["cost"]["True"]
    workload = "Llama-3-8B bf16, 256 x 128/256" if gpu else "bundled model fp32, 32 x 64 out"
    print(f"\n| cost ({workload}) | off | on | on / off |")
    print("| --- | --- | --- | --- |")
    for key, label in (
        ("batch1_ms_per_token", "batch-1 decode ms/token"),
        ("offline_out_tok_s", "out tok/s"),
    ):
        print(f"| {label} | {off[key]:.2f} | {on[key]:.2f} | {on[key] / off[key]:.2f}x |")


if __name__ == "__main__":
    main()
