"""Where a speculating engine's time goes on the GPU: a kernel timeline of batch-1 decoding, plain and
speculative, split by the launch that queued each kernel (Llama-3-8B target, dummy weights).

torch.profiler records the run (CPU ranges around the engine's step, the proposer, the draft's and the
target's launches, and the resolve; every kernel with the CUDA call that queued it). For each kind of
launch the table gives its host time, the device time of the kernels it queued, and how many; then the
device's idle time, charged to the launch whose kernel ended the gap (the device waited for it); last the
biggest kernels of a verify launch against a plain decode launch.

    python benchmarks/spec_profile.py --json spec_profile.json [--trace_dir DIR]
    python benchmarks/spec_profile.py --device cpu --model /path/tiny --small_draft /path/other-tiny \\
        --load_format auto --dtype float32 --max_tokens 12   # the script's paths, on the CPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gzip
import json
import random
import tempfile
from pathlib import Path

import torch
from spec_gpu import SMALL_DRAFT, TARGET, target_step_kind  # benchmarks/ is on the path
from torch.profiler import ProfilerActivity, profile, record_function

from tensorjet import LLM, SamplingParams

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def annotate(obj, name: str, label) -> None:
    """Wrap obj.name in a profiler range labelled label(*args) (a string, or a function of the call)."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with record_function(label(*args) if callable(label) else label):
            return original(*args, **kwargs)

    setattr(obj, name, wrapper)


def target_label(batch, *_) -> str:
    return f"{target_step_kind(batch)}_launch"


def instrument(llm: LLM) -> None:
    core = llm.engine
    annotate(core, "step", "engine_step")
    annotate(core, "_resolve", "resolve")
    annotate(core.runner, "launch", target_label)
    if core.speculator is not None:
        annotate(core.speculator, "propose", "propose")
        for runner in core.speculator.runners:
            annotate(runner, "launch", "draft_launch")


def build(args, **speculation) -> LLM:
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=8,
        kv_cache_max_tokens=args.kv_cache_max_tokens,
        num_speculative_tokens=args.k,
        **speculation,
    )
    instrument(llm)
    return llm


def record(llm: LLM, args, speculate: bool, fixed: float | None) -> tuple[list[dict], int]:
    """The trace events of one batch-1 greedy request (after a warm-up), and the tokens it decoded."""
    core = llm.engine
    speculator = core.speculator
    core.runner.verifier.fixed_acceptance = fixed
    if not speculate:
        core.speculator = None
    vocab = min(core.source.hf_config.vocab_size, 32000)
    rng = random.Random(0)
    prompt = [rng.randrange(vocab) for _ in range(32)] * 4  # repeats itself: prompt lookup finds drafts
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        llm.generate([prompt], params, use_tqdm=False)  # warm
        # The engine steps on its own thread, and the profiler records the thread that starts it.
        prof = profile(activities=activities)
        llm.loop.call(prof.start)
        out = llm.generate([prompt], params, use_tqdm=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        llm.loop.call(prof.stop)
    finally:
        core.speculator = speculator
        core.runner.verifier.fixed_acceptance = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return events, len(out[0].outputs[0].token_ids)


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def analyse(events: list[dict], tokens: int) -> dict:
    """Per launch kind: host ms, device ms and kernels per launch; device idle charged to the launch
    whose kernel ended each gap; per-token wall and busy time; top kernels of verify/decode launches."""
    spans = [e for e in events if e.get("ph") == "X"]
    ranges = sorted((e for e in spans if e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    calls = [e for e in spans if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})]
    runtime = {e["args"]["correlation"]: e for e in calls}
    device = sorted((e for e in spans if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])

    def launcher(kernel: dict) -> str:
        """The innermost launch range (or "other") around the CUDA call that queued `kernel`."""
        call = runtime.get(kernel.get("args", {}).get("correlation"))
        if call is None:
            return "unknown"
        best, best_dur = "other", float("inf")
        for r in ranges:
            if r["ts"] > call["ts"]:
                break
            if r["ts"] + r["dur"] >= call["ts"] and r["dur"] < best_dur and r["name"] != "engine_step":
                best, best_dur = r["name"], r["dur"]
        return best

    kinds: dict[str, dict] = collections.defaultdict(lambda: collections.defaultdict(float))
    for r in ranges:
        kinds[r["name"]]["calls"] += 1
        kinds[r["name"]]["host_ms"] += r["dur"] / 1e3
    per_kernel: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    idle_before: dict[str, float] = collections.defaultdict(float)
    previous_end = None
    owners = []
    for k in device:
        owner = launcher(k)
        owners.append(owner)
        kinds[owner]["device_ms"] += k["dur"] / 1e3
        kinds[owner]["kernels"] += 1
        per_kernel[owner][k["name"][:90]] += k["dur"] / 1e3
        if previous_end is not None and k["ts"] > previous_end:
            idle_before[owner] += (k["ts"] - previous_end) / 1e3
        previous_end = max(previous_end or 0.0, k["ts"] + k["dur"])
    # Per decoded token: the steps after the first (the prefill), and the device's work meanwhile.
    steps = [r for r in ranges if r["name"] == "engine_step"][1:]
    wall_ms = sum(r["dur"] for r in steps) / 1e3
    since = steps[0]["ts"] if steps else float("inf")
    busy_ms = union_length([(k["ts"], k["ts"] + k["dur"]) for k in device if k["ts"] >= since]) / 1e3
    table = {}
    for name, v in kinds.items():
        calls = v["calls"] or 1
        table[name] = {
            "calls": v["calls"],
            "host_ms_per_call": v["host_ms"] / calls,
            "device_ms_per_call": v["device_ms"] / calls,
            "kernels_per_call": v["kernels"] / calls,
            "idle_before_ms_total": idle_before.get(name, 0.0),
        }
    tops = {}
    for name in ("verify_launch", "decode_launch", "draft_launch"):
        calls = kinds[name]["calls"] or 1
        tops[name] = [(kernel, ms / calls) for kernel, ms in per_kernel[name].most_common(14)]
    return {
        "tokens": tokens,
        "wall_ms_per_token": wall_ms / max(tokens - 1, 1),
        "busy_ms_per_token": busy_ms / max(tokens - 1, 1),
        "kinds": table,
        "top_kernels": tops,
    }


def report(name: str, result: dict) -> str:
    lines = [
        f"== {name}: {result['tokens']} tokens, wall {result['wall_ms_per_token']:.3f} ms/token, "
        f"device busy {result['busy_ms_per_token']:.3f} ms/token",
        f"{'range':<15} {'calls':>6} {'host ms':>8} {'device ms':>9} {'kernels':>8} {'idle before ms':>14}",
    ]
    for kind, v in sorted(result["kinds"].items()):
        lines.append(
            f"{kind:<15} {v['calls']:>6.0f} {v['host_ms_per_call']:>8.3f} {v['device_ms_per_call']:>9.3f} "
            f"{v['kernels_per_call']:>8.1f} {v['idle_before_ms_total']:>14.2f}"
        )
    for launch, kernels in result["top_kernels"].items():
        if kernels:
            lines.append(f"-- top kernels per {launch} (ms)")
            lines += [f"   {ms:7.3f}  {kernel}" for kernel, ms in kernels]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=TARGET)
    parser.add_argument("--small_draft", default=SMALL_DRAFT)
    parser.add_argument("--load_format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--kv_cache_max_tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trace_dir", type=Path, help="also keep each run's Chrome trace (gzipped) here")
    args = parser.parse_args()

    runs = [  # (engine, run name, speculate, fixed acceptance)
        ("draft", "plain", False, None),
        ("draft", "1b a=1.0", True, 1.0),
        ("draft", "1b a=0.7", True, 0.7),
        ("ngram", "ngram a=0.7", True, 0.7),
    ]
    results, texts = {}, []
    for engine_name in ("draft", "ngram"):
        model = args.small_draft if engine_name == "draft" else "[ngram]"
        llm = build(args, speculative_model=model)
        print(f"{engine_name}: fused rows {list(llm.engine.runner.model.fused_rows)}", flush=True)
        for engine, name, speculate, fixed in runs:
            if engine != engine_name:
                continue
            events, tokens = record(llm, args, speculate, fixed)
            if args.trace_dir:
                args.trace_dir.mkdir(parents=True, exist_ok=True)
                path = args.trace_dir / f"{name.replace(' ', '_').replace('=', '')}.json.gz"
                with gzip.open(path, "wt") as f:
                    json.dump({"traceEvents": events}, f)
            results[name] = analyse(events, tokens)
            texts.append(report(name, results[name]))
            print(texts[-1], flush=True)
        llm.shutdown()
        del llm
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        summary = {"device": device, "config": vars(args), "runs": results}
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    print("\n\n".join(texts))


if __name__ == "__main__":
    main()
