"""Where a step's GPU time goes, kernel by kernel (Llama-3-8B shapes, dummy bf16 weights).

For each scenario the engine is driven step by step; a few steps run under torch.profiler with CUDA
activity, and the kernels are grouped by name. Printed per step: wall time, the sum of kernel
durations (busy), how many kernels, the top kernel groups, and the device's idle time between
consecutive kernels by transition (`kernel_gaps`). The wall time includes the host's time to step the
engine under the profiler, so `wall - busy` overstates what kernel boundaries cost; the gaps inside a
step measure it (batch-256 decode on the H200: 0.17-0.20 ms of an 11.4 ms step).

Scenarios: decode at batch 1 (context ~256) with CUDA graphs on and off, and with the fused batch-1
layer on and off (`LlamaForCausalLM.fused_decode`), and with PDL off; decode at batch 256 with
~1,500 tokens of context (the 1000 x 1000 workload's middle); the prefill steps that fill it. With
`--hf_workload`, the batch-256 part runs HF's workload instead (256 prompts of 100-1,024 tokens, 256
out): its prefill steps, and decode steps a hundred tokens in (contexts ~200-1,100).

    python benchmarks/profile_kernels.py [--out $OUT/profile_kernels.json] [--hf_workload]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import re
import time
from pathlib import Path

import torch

from tensorjet import LLM, SamplingParams

MODEL = "meta-llama/Meta-Llama-3-8B"


def kernel_group(name: str) -> str:
    """A short, stable label for a kernel name (cuBLAS names carry tile shapes; Triton names don't)."""
    if "gemm" in name.lower() or "gemv" in name.lower() or name.startswith(("sm90_", "cutlass", "nvjet")):
        return "matmul: " + re.sub(r"\d+x\d+x\d+.*", "", name)[:48]
    return name[:64]


def profile_steps(llm: LLM, num_steps: int) -> dict:
    engine = llm.engine
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    busy = 0.0
    kernels = []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us, group = event.device_time, kernel_group(event.name)
        busy += us
        g = groups[group]
        g[0] += us
        g[1] += 1
        kernels.append((event.time_range.start, event.time_range.end, group))
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:14]
    return {
        "wall_ms_per_step": wall * 1e3 / num_steps,
        "busy_ms_per_step": busy / 1e3 / num_steps,
        "kernels_per_step": len(kernels) / num_steps,
        "top": [(name, us / 1e3 / num_steps, n / num_steps) for name, (us, n) in top],
        "gaps": kernel_gaps(kernels, num_steps),
    }


def kernel_gaps(kernels: list[tuple[float, float, str]], num_steps: int, host_wait_us: float = 200.0) -> dict:
    """Idle device time between consecutive kernels, by transition (previous kernel -> next kernel).

    A gap over `host_wait_us` is the device waiting for the host (between steps) and counted apart;
    the rest is what each kernel boundary costs inside a step (launch and ramp)."""
    kernels = sorted(kernels)
    inside: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    host_waits = 0.0
    for (_, prev_end, prev), (start, _, name) in zip(kernels, kernels[1:]):
        gap = start - prev_end
        if gap > host_wait_us:
            host_waits += gap
        elif gap > 0:
            g = inside[f"{prev[:40]} -> {name[:40]}"]
            g[0] += gap
            g[1] += 1
    total = sum(us for us, _ in inside.values())
    top = sorted(inside.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "inside_ms_per_step": total / 1e3 / num_steps,
        "host_waits_ms_per_step": host_waits / 1e3 / num_steps,
        "top": [(name, us / 1e3 / num_steps, n / num_steps) for name, (us, n) in top],
    }


def add(llm: LLM, prompts: list[list[int]], max_tokens: int, tag: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        llm.engine.add_request(f"{tag}-{i}", p, params)


def drain(llm: LLM) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def show(title: str, r: dict) -> None:
    print(
        f"\n== {title}: wall {r['wall_ms_per_step']:.3f} ms/step, "
        f"kernels busy {r['busy_ms_per_step']:.3f} ms, {r['kernels_per_step']:.0f} kernels/step"
    )
    for name, ms, n in r["top"]:
        print(f"   {ms:8.3f} ms  {n:6.1f}x  {name}")
    gaps = r["gaps"]
    print(
        f"   gaps between kernels: {gaps['inside_ms_per_step']:.3f} ms/step inside steps, "
        f"{gaps['host_waits_ms_per_step']:.3f} ms/step waiting for the host; largest transitions:"
    )
    for name, ms, n in gaps["top"]:
        print(f"   {ms:8.3f} ms  {n:6.1f}x  {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/profile_kernels.json")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--max_batch_size", type=int, default=256)
    parser.add_argument("--kv_cache_dtype", default="auto")
    parser.add_argument("--batch1_only", action="store_true", help="skip the batch-256 and prefill steps")
    parser.add_argument("--hf_workload", action="store_true", help="batch 256 on 100-1,024-token prompts")
    parser.add_argument("--skip_batch1", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # GEMV choices, capture time
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        max_batch_size=args.max_batch_size,
        max_num_tokens=8192,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    vocab = min(128000, llm.engine.source.hf_config.vocab_size)
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    results: dict = {}
    runner = llm.engine.runner
    # The engine is stepped from this thread only: `llm.generate` would start the background engine
    # loop, which would step it concurrently.
    add(llm, [ids(300) for _ in range(8)], 4, "compile")
    drain(llm)

    # Batch 1: prompt 200, profile steps 40..56 of the decode; graphs on and off; the fused batch-1
    # layer (`LlamaForCausalLM.fused_decode`, on where it measured faster) against cuBLAS plus separate
    # norm/SiLU/add kernels; and programmatic dependent launch off (TENSORJET_PDL=0, graphs recaptured).
    model = runner.model
    fused_default = model.fused_decode
    scenarios = ((True, fused_default, True), (False, fused_default, True), (True, not fused_default, True))
    for graphs_on, fused, pdl in () if args.skip_batch1 else scenarios + ((True, fused_default, False),):
        saved = runner.decode_graphs
        model.fused_decode = fused
        os.environ["TENSORJET_PDL"] = "1" if pdl else "0"
        if not graphs_on:
            runner.decode_graphs = None
        elif fused != fused_default or not pdl:
            runner.decode_graphs = runner._build_decode_graphs()  # recaptured with the other kernels
        add(llm, [ids(200)], 80, f"b1-{graphs_on}-{fused}-{pdl}")
        for _ in range(40):
            llm.engine.step()
        key = f"decode_b1_graphs_{'on' if graphs_on else 'off'}" + ("_fused" if fused else "_unfused")
        key += "" if pdl else "_no_pdl"
        results[key] = r = profile_steps(llm, 16)
        show(key, r)
        drain(llm)
        runner.decode_graphs, model.fused_decode = saved, fused_default
        os.environ["TENSORJET_PDL"] = "1"
    if args.batch1_only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        llm.shutdown()
        return

    # Batch 256 at ~1,500 context: 256 prompts of 1,400, prefill profiled on the way (or HF's workload).
    if args.hf_workload:
        add(llm, [ids(rng.randint(100, 1024)) for _ in range(args.max_batch_size)], 256, "hf")
        label, key = "~100-1,100 context (HF's workload)", "decode_b256_hf"
    else:
        add(llm, [ids(1400) for _ in range(args.max_batch_size)], 300, "big")
        label, key = "~1,500 context", "decode_b256_ctx1500"
    llm.engine.step()
    results["prefill_8192"] = r = profile_steps(llm, 3)
    show("prefill steps, 8192 tokens", r)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in llm.engine.scheduler.running) or (
        llm.engine.scheduler.waiting
    ):
        llm.engine.step()
    for _ in range(60 if not args.hf_workload else 100):
        llm.engine.step()
    results[key] = r = profile_steps(llm, 10)
    show(f"decode, batch {args.max_batch_size}, {label}", r)
    drain(llm)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    llm.shutdown()


if __name__ == "__main__":
    main()
