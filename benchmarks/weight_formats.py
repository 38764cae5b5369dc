"""One weight format against bf16 weights on one device, in one run (what `fp8_gpu.py` and
`int4_gpu.py` measure): dummy weights of a preset's shapes, each engine in turn.

- the copy rate of the device (a device-to-device copy: bytes read + written per second);
- batch-1 decode (128-token prompt, 256 new tokens): ms per token, against its limit, the bytes a step
  reads (every decoder-layer projection's parameters + the LM head) / the copy rate; batch-64 decode;
- `in_out` in / `in_out` out, `requests` requests, FP8 KV cache in both (`--bf16_kv`: the bf16 engine's
  in bf16, as the default engine keeps it): output tok/s, peak memory;
- the guide's `tensorjet bench --batch_size 64 --input_len 128 --output_len 256 --dtype ...`.
Writes JSON after each part (what is done survives a time limit) and prints a table last. On the CPU
(`--device cpu` with a tiny model) every code path runs at small sizes: a smoke test.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import torch
from gpu_suite import decode_latency, release_gpu_memory, set_model, throughput, warm_up

MAX_BATCH = 512  # sequences at once: the FP8 KV pool of an 8B model holds 900 of 2,000 tokens


def copy_rate_tbps(device: str, gib: float = 2, repeats: int = 20) -> float:
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    del src, dst
    return 2 * gib * 2**30 / seconds / 1e12


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def projections(layer) -> list:
    return [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]


def bytes_per_decode_step(llm) -> int:
    """Weights one decode step reads: every decoder-layer projection's parameters (with their scales,
    zero points, permutations) and the LM head (not the embedding, of which a step reads one row). An
    INT4 projection whose one-row products run tinygemm reads that copy of its codes alone."""
    model = llm.engine.runner.model
    total = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    for layer in model.layers:
        for proj in projections(layer):
            tinygemm = getattr(proj.method, "tinygemm_max_rows", 0) >= 1
            total += sum(
                p.numel() * p.element_size()
                for name, p in proj.named_parameters()
                if name.startswith("tinygemm_") == tinygemm
            )
    return total


def engine(model: str, dtype: str, device: str, kv_cache_dtype: str = "fp8", **options):
    from tensorjet import LLM

    return LLM(
        model=model,
        load_format="dummy",
        dtype=dtype,
        device=device,
        max_num_tokens=8192,
        kv_cache_dtype=kv_cache_dtype,
        max_batch_size=MAX_BATCH,
        **options,
    )


def guide_bench(model: str, dtype: str, device: str, input_len: int = 128, output_len: int = 256) -> dict:
    """The guide's command, in process; its JSON report."""
    from tensorjet.bench.cli import main as bench_main

    path = Path(f"/tmp/weight_formats_bench_{dtype}.json")
    argv = ["bench", "--model", model, "--load_format", "dummy", "--batch_size", "64"]
    argv += ["--input_len", str(input_len), "--output_len", str(output_len), "--dtype", dtype]
    argv += ["--device", device, "--report_json", str(path)]
    out = io.StringIO()
    with redirect_stdout(out):
        code = bench_main(argv)
    print(out.getvalue().splitlines()[-1] if out.getvalue() else "")
    if code != 0:
        raise RuntimeError(f"tensorjet bench --dtype {dtype} exited {code}")
    return json.loads(path.read_text())


def add_arguments(parser: argparse.ArgumentParser, formats: dict[str, str], out: str) -> None:
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-8B")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=1000, help="requests of IN_OUT in / IN_OUT out")
    parser.add_argument("--in_out", type=int, default=1000, help="prompt and output tokens of the long run")
    parser.add_argument("--only", choices=sorted(formats), default=None, help="one weight format alone")
    parser.add_argument("--skip_bench", action="store_true", help="skip the guide's bench command")
    parser.add_argument("--bench_only", action="store_true", help="only the guide's bench command")
    parser.add_argument(
        "--bf16_kv",
        action="store_true",
        help="the bf16-weights engine keeps its KV cache in bf16 (the default engine), not in FP8",
    )
    parser.add_argument("--out", default=out)


def run(args: argparse.Namespace, formats: dict[str, str], extra: Callable | None = None) -> dict:
    """Every part for each of `formats` (name -> dtype option), one engine at a time; `extra(name, llm,
    run)` adds a format's own measurements to its `run` dict."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tensorjet.runtime.kernel_selection").setLevel(logging.INFO)  # each kernel chosen
    on_gpu = args.device.startswith("cuda")
    set_model(args.model)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    copy = copy_rate_tbps(args.device, gib=2 if on_gpu else 0.25)
    results: dict = {"model": args.model, "device": device_name, "copy_tbps": copy, "runs": {}}
    print(f"{device_name}: copy rate {copy:.2f} TB/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    small = not on_gpu  # the CPU smoke test: short sequences
    bench_lengths = (16, 8) if small else (128, 256)
    for name in [args.only] if args.only else list(formats):
        part: dict = results["runs"].setdefault(name, {})
        if not args.bench_only:
            hook = None if extra is None else (lambda llm, part, name=name: extra(name, llm, part))
            _engine_parts(args, formats[name], part, copy, on_gpu, small, hook)
            out.write_text(json.dumps(results, indent=2))
        if not args.skip_bench:
            part["guide_bench"] = guide_bench(args.model, formats[name], args.device, *bench_lengths)
            release_gpu_memory()
            out.write_text(json.dumps(results, indent=2))
    return results


def _engine_parts(args, dtype: str, part: dict, copy: float, on_gpu: bool, small: bool, extra) -> None:
    begin = time.perf_counter()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    part["kv_cache_dtype"] = "auto" if args.bf16_kv and dtype == "bfloat16" else "fp8"
    llm = engine(args.model, dtype, args.device, part["kv_cache_dtype"])
    part["load_and_capture_s"] = time.perf_counter() - begin
    stats = llm.stats()
    part["weight_gb"] = stats["weight_bytes"] / 1e9
    part["weight_format"] = stats["weight_format"]
    step_bytes = bytes_per_decode_step(llm)
    part["decode_step_gb"] = step_bytes / 1e9
    part["decode_limit_ms"] = step_bytes / (copy * 1e12) * 1e3
    if on_gpu:  # compiles the Triton variants mixed steps use (prompts too long for a tiny model)
        warm_up(llm, seed=98)
    lengths = (16, 8) if small else ()
    part["decode_b1"] = decode_latency(llm, 1, *lengths)
    part["decode_b64"] = decode_latency(llm, 4 if small else 64, *lengths)
    b1 = part["decode_b1"]["ms_per_step"]
    print(f"{dtype}: b1 {b1:.3f} ms (limit {part['decode_limit_ms']:.3f})", flush=True)
    if extra is not None:
        extra(llm, part)
    part["throughput_long"] = throughput(llm, [(args.in_out, args.in_out)] * args.requests)
    if on_gpu:
        part["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"{dtype}: {args.in_out}x{args.in_out} {part['throughput_long']['output_tok_s']:.0f} tok/s")
    llm.shutdown()
    del llm
    release_gpu_memory()


def _cell(value, part: dict) -> str:
    try:
        return value(part)
    except KeyError:  # a part this run skipped
        return "-"


def print_table(results: dict, title: str, in_out: int) -> None:
    """The runs side by side, with the second format's ratio to the first where there are two."""
    runs = results["runs"]
    where = f"{results['model']} (dummy) on {results['device']}, copy {results['copy_tbps']:.2f} TB/s"
    print(f"\n{title}, {where}")
    rows = [
        ("KV cache", lambda r: "bf16" if r["kv_cache_dtype"] == "auto" else r["kv_cache_dtype"]),
        ("weights GB", lambda r: f"{r['weight_gb']:.2f}"),
        ("decode step reads GB", lambda r: f"{r['decode_step_gb']:.2f}"),
        ("batch-1 ms/token", lambda r: f"{r['decode_b1']['ms_per_step']:.3f}"),
        ("  limit ms (bytes / copy)", lambda r: f"{r['decode_limit_ms']:.3f}"),
        ("  x limit", lambda r: f"{r['decode_b1']['ms_per_step'] / r['decode_limit_ms']:.3f}"),
        ("batch-64 ms/step", lambda r: f"{r['decode_b64']['ms_per_step']:.3f}"),
        ("bench b64 128/256 out tok/s", lambda r: f"{r['guide_bench']['output_throughput']:.0f}"),
        (f"{in_out}x{in_out} out tok/s", lambda r: f"{r['throughput_long']['output_tok_s']:.0f}"),
        ("peak memory GB", lambda r: f"{r['peak_memory_gb']:.1f}"),
    ]
    names = list(runs)
    ratio_label = f"{names[1]}/{names[0]}" if len(names) == 2 else ""
    print(f"{'':<30}" + "".join(f"{n:>12}" for n in names) + f"{ratio_label:>12}")
    for label, value in rows:
        cells = [_cell(value, runs[n]) for n in names]
        ratio = ""
        if len(names) == 2:
            try:
                ratio = f"{float(cells[1]) / float(cells[0]):>12.3f}"
            except (ValueError, ZeroDivisionError):
                ratio = ""
        print(f"{label:<30}" + "".join(f"{c:>12}" for c in cells) + ratio)
