"""tensorjet vs HF transformers `generate` on this CPU, same run, same model (bundled SmolLM2-135M, fp32).

Two workloads (EOS ignored so both sides produce exactly the requested tokens):
  batch 1   : one 128-token prompt, 64 new tokens -> decode tokens/s
  batch 32  : 32 requests of 128 in / 64 out      -> output tokens/s (HF: one padded batch of 32)

Physical limit for the decode step: every weight byte is read once per step, so
ms/step >= weight bytes / memory bandwidth; we print the weight bytes so the reader can relate.

    python benchmarks/cpu_vs_hf.py [--out benchmarks/results/cpu_vs_hf.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

PROMPT_LEN, NEW_TOKENS, BATCH = 128, 64, 32


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (n, PROMPT_LEN), generator=g).tolist()


def bench_tensorjet(prompts_1, prompts_32) -> dict:
    from tensorjet import LLM, SamplingParams

    llm = LLM(device="cpu", dtype="float32")  # the GGUF's fp32 weights, as HF runs them
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    warmup = random_prompts(1, 49152, seed=99)  # not the measured prompts: no prefix-cache help
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    out = llm.generate(prompts_1, params, use_tqdm=False)[0]
    single = time.perf_counter() - start
    ttft = out.metrics.first_token_time - out.metrics.arrival_time
    start = time.perf_counter()
    outs = llm.generate(prompts_32, params, use_tqdm=False)
    batch = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    llm.shutdown()
    return {
        "batch1_tok_s": NEW_TOKENS / single,
        "batch1_decode_ms_per_token": (single - ttft) / (NEW_TOKENS - 1) * 1e3,
        "batch32_output_tok_s": BATCH * NEW_TOKENS / batch,
        "weight_bytes": weight_bytes,
        "first_tokens": out.outputs[0].token_ids[:8],
    }


def bench_hf(prompts_1, prompts_32) -> dict:
    from transformers import AutoModelForCausalLM

    from tensorjet.models.loader import resolve_model

    src = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(
        src.path.parent, gguf_file=src.path.name, dtype=torch.float32
    ).eval()
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(torch.tensor(prompts_1), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(torch.tensor(prompts_1), **kwargs)
        single = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            torch.tensor(prompts_32), attention_mask=torch.ones(BATCH, PROMPT_LEN, dtype=torch.long), **kwargs
        )
        batch = time.perf_counter() - start
    return {
        "batch1_tok_s": NEW_TOKENS / single,
        "batch32_output_tok_s": BATCH * NEW_TOKENS / batch,
        "first_tokens": out[0, PROMPT_LEN : PROMPT_LEN + 8].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/cpu_vs_hf.json")
    args = parser.parse_args()
    vocab = 49152
    prompts_1 = random_prompts(1, vocab, seed=1)
    prompts_32 = random_prompts(BATCH, vocab, seed=2)
    ours = bench_tensorjet(prompts_1, prompts_32)
    hf = bench_hf(prompts_1, prompts_32)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "commit": commit,
        "tensorjet": ours,
        "hf_transformers": hf,
        "same_greedy_tokens": ours["first_tokens"] == hf["first_tokens"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nweights read per decode step: {ours['weight_bytes'] / 1e6:.0f} MB (fp32)")
    print(f"{'workload':<34}{'tensorjet':>12}{'HF':>12}{'ratio':>8}")
    for key, label in (
        ("batch1_tok_s", "batch 1, 128 in / 64 out (tok/s)"),
        ("batch32_output_tok_s", "32 req, 128 in / 64 out (tok/s)"),
    ):
        print(f"{label:<34}{ours[key]:>12.1f}{hf[key]:>12.1f}{ours[key] / hf[key]:>7.2f}x")


if __name__ == "__main__":
    main()
