"""FP8 weights against bf16 weights on one GPU, in one run: Llama-3-8B shapes, dummy weights.

- the copy rate of this GPU (a 2 GiB device-to-device copy: bytes read + written per second);
- batch-1 decode (128-token prompt, 256 new tokens): ms per token, against its limit, the bytes a step
  reads (every linear weight + the LM head; FP8 linear weights are 1 byte each) / the copy rate;
- the guide's `tensorjet bench --batch_size 64 --input_len 128 --output_len 256 --dtype fp8` and the
  same command with `--dtype bfloat16`: output tok/s;
- 1000 in / 1000 out, `--requests` requests, FP8 KV cache in both: FP8 weights against bf16 weights.

    python benchmarks/fp8_gpu.py [--model meta-llama/Meta-Llama-3-8B] [--requests 1000] [--out FILE]

Prints a table last and writes JSON. `--model meta-llama/Meta-Llama-3-70B --only fp8` runs the FP8
engine alone (the 70B model in FP8 fits one 141 GB H200; in bf16 it does not) and reports its peak
memory.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from gpu_suite import FP8_MAX_BATCH, decode_latency, release_gpu_memory, set_model, throughput, warm_up

WEIGHTS = {"bf16": "bfloat16", "fp8": "fp8"}


def copy_rate_tbps(gib: int = 2, repeats: int = 20) -> float:
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    del src, dst
    return 2 * gib * 2**30 / seconds / 1e12


def bytes_per_decode_step(llm) -> int:
    """Weights one decode step reads: every decoder-layer projection and the LM head (not the embedding,
    of which a step reads one row)."""
    model = llm.engine.runner.model
    total = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    for layer in model.layers:
        for proj in (
            layer.self_attn.qkv_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        ):
            total += proj.weight.numel() * proj.weight.element_size()
    return total


def engine(model: str, weights: str, **options):
    from tensorjet import LLM

    return LLM(
        model=model,
        load_format="dummy",
        dtype=WEIGHTS[weights],
        max_num_tokens=8192,
        kv_cache_dtype="fp8",
        max_batch_size=FP8_MAX_BATCH,
        **options,
    )


def guide_bench(model: str, dtype: str) -> dict:
    """The guide's command, in process; its JSON report."""
    from tensorjet.bench.cli import main as bench_main

    path = Path(f"/tmp/fp8_gpu_bench_{dtype}.json")
    argv = ["bench", "--model", model, "--load_format", "dummy", "--batch_size", "64", "--input_len", "128"]
    argv += ["--output_len", "256", "--dtype", dtype, "--report_json", str(path)]
    out = io.StringIO()
    with redirect_stdout(out):
        code = bench_main(argv)
    print(out.getvalue().splitlines()[-1] if out.getvalue() else "")
    if code != 0:
        raise RuntimeError(f"tensorjet bench --dtype {dtype} exited {code}")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-8B")
    parser.add_argument("--requests", type=int, default=1000, help="requests of 1000 in / 1000 out")
    parser.add_argument("--only", choices=sorted(WEIGHTS), default=None, help="one weight format alone")
    parser.add_argument("--skip_bench", action="store_true", help="skip the guide's bench command")
    parser.add_argument("--bench_only", action="store_true", help="only the guide's bench command")
    parser.add_argument("--out", default="benchmarks/results/fp8_gpu.json")
    args = parser.parse_args()
    # The kernel each FP8 projection gets, with its timings (the engine logs them at start-up).
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tensorjet.runtime.kernel_selection").setLevel(logging.INFO)
    set_model(args.model)
    device = torch.cuda.get_device_name()
    results: dict = {"model": args.model, "device": device, "copy_tbps": copy_rate_tbps(), "runs": {}}
    print(f"{device}: copy rate {results['copy_tbps']:.2f} TB/s", flush=True)
    formats = [args.only] if args.only else ["bf16", "fp8"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for weights in formats:
        run: dict = results["runs"].setdefault(weights, {})
        if args.bench_only:
            run["guide_bench"] = guide_bench(args.model, WEIGHTS[weights])
            release_gpu_memory()
            out.write_text(json.dumps(results, indent=2))
            continue
        begin = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        llm = engine(args.model, weights)
        run["load_and_capture_s"] = time.perf_counter() - begin
        stats = llm.stats()
        run["weight_gb"] = stats["weight_bytes"] / 1e9
        run["weight_format"] = stats["weight_format"]
        step_bytes = bytes_per_decode_step(llm)
        run["decode_step_gb"] = step_bytes / 1e9
        run["decode_limit_ms"] = step_bytes / (results["copy_tbps"] * 1e12) * 1e3
        warm_up(llm, seed=98)
        run["decode_b1"] = decode_latency(llm, 1)
        run["decode_b64"] = decode_latency(llm, 64)
        print(
            f"{weights}: b1 {run['decode_b1']['ms_per_step']:.3f} ms (limit {run['decode_limit_ms']:.3f})",
            flush=True,
        )
        run["throughput_1000x1000"] = throughput(llm, [(1000, 1000)] * args.requests)
        run["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"{weights}: 1000x1000 {run['throughput_1000x1000']['output_tok_s']:.0f} tok/s", flush=True)
        llm.shutdown()
        del llm
        release_gpu_memory()
        out.write_text(json.dumps(results, indent=2))  # what is done so far survives a time limit
        if not args.skip_bench:
            run["guide_bench"] = guide_bench(args.model, WEIGHTS[weights])
            release_gpu_memory()
            out.write_text(json.dumps(results, indent=2))
    print_table(results)


def _cell(value, run: dict) -> str:
    try:
        return value(run)
    except KeyError:  # a part this run skipped
        return "-"


def print_table(results: dict) -> None:
    runs = results["runs"]
    where = f"{results['model']} (dummy) on {results['device']}, copy {results['copy_tbps']:.2f} TB/s"
    print(f"\nFP8 vs bf16 weights, {where}")
    rows = [
        ("weights GB", lambda r: f"{r['weight_gb']:.2f}"),
        ("decode step reads GB", lambda r: f"{r['decode_step_gb']:.2f}"),
        ("batch-1 ms/token", lambda r: f"{r['decode_b1']['ms_per_step']:.3f}"),
        ("  limit ms (bytes / copy)", lambda r: f"{r['decode_limit_ms']:.3f}"),
        ("  x limit", lambda r: f"{r['decode_b1']['ms_per_step'] / r['decode_limit_ms']:.3f}"),
        ("batch-64 ms/step", lambda r: f"{r['decode_b64']['ms_per_step']:.3f}"),
        (
            "bench b64 128/256 out tok/s",
            lambda r: f"{r['guide_bench']['output_throughput']:.0f}" if "guide_bench" in r else "-",
        ),
        ("1000x1000 out tok/s", lambda r: f"{r['throughput_1000x1000']['output_tok_s']:.0f}"),
        ("peak memory GB", lambda r: f"{r['peak_memory_gb']:.1f}"),
    ]
    names = list(runs)
    print(f"{'':<30}" + "".join(f"{n:>12}" for n in names) + ("   fp8/bf16" if len(names) == 2 else ""))
    for label, value in rows:
        cells = [_cell(value, runs[n]) for n in names]
        ratio = ""
        if len(names) == 2:
            try:
                ratio = f"{float(cells[1]) / float(cells[0]):>11.3f}"
            except (ValueError, ZeroDivisionError):
                ratio = ""
        print(f"{label:<30}" + "".join(f"{c:>12}" for c in cells) + ratio)


if __name__ == "__main__":
    main()
