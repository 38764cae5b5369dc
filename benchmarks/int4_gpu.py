"""INT4 (W4A16) weights against bf16 weights on one GPU, in one run: Llama-3-8B shapes, dummy weights.

- the copy rate of this GPU (a 2 GiB device-to-device copy: bytes read + written per second);
- batch-1 decode (128-token prompt, 256 new tokens): ms per token, against its limit, the bytes a step
  reads (every linear layer's codes, scales, zero points + the bf16 LM head) / the copy rate;
- each Llama-3-8B projection's batch-1 product alone, in CUDA graphs with cold weights: tensorjet's
  W4A16 GEMV (the tile kernel selection chose) against gpt-fast's int4 path (PyTorch's tinygemm
  `_weight_int4pack_mm`, group 128, the same shapes) and bf16 cuBLAS;
- the guide's `tensorjet bench --batch_size 64 --input_len 128 --output_len 256 --dtype int4_awq` and
  the same command with `--dtype bfloat16`: output tok/s (INT4 must not lose at batch 64);
- 1000 in / 1000 out, `--requests` requests, FP8 KV cache in both: output tok/s and peak memory.

    python benchmarks/int4_gpu.py [--model meta-llama/Meta-Llama-3-8B] [--requests 1000] [--out FILE]
    python benchmarks/int4_gpu.py --model meta-llama/Meta-Llama-3-70B --only int4 --requests 200

Prints a table last and writes JSON after each part. The second line runs the 70B model in INT4 alone
(35 GB of codes: it fits one 80 GB H100; in bf16 it does not) and reports its peak memory.
On the CPU (a smoke test of every code path): `--device cpu --model tests/data/quantized/llama-tiny
--requests 2 --in_out 32`.
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
from gpu_suite import decode_latency, release_gpu_memory, set_model, throughput, warm_up

WEIGHTS = {"bf16": "bfloat16", "int4": "int4_awq"}
MAX_BATCH = 512


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


def _projections(layer) -> list:
    return [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]


def bytes_per_decode_step(llm) -> int:
    """Weights one decode step reads: every decoder-layer projection's parameters (INT4: codes, scales,
    zero points, act-order permutation) and the LM head (not the embedding: a step reads one row)."""
    model = llm.engine.runner.model
    total = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    for layer in model.layers:
        for proj in _projections(layer):
            total += sum(p.numel() * p.element_size() for p in proj.parameters())
    return total


def engine(model: str, weights: str, device: str, **options):
    from tensorjet import LLM

    return LLM(
        model=model,
        load_format="dummy",
        dtype=WEIGHTS[weights],
        device=device,
        max_num_tokens=8192,
        kv_cache_dtype="fp8",
        max_batch_size=MAX_BATCH,
        **options,
    )


def guide_bench(model: str, dtype: str, device: str, input_len: int = 128, output_len: int = 256) -> dict:
    """The guide's command, in process; its JSON report."""
    from tensorjet.bench.cli import main as bench_main

    path = Path(f"/tmp/int4_gpu_bench_{dtype}.json")
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


# ---- the batch-1 products alone: tensorjet's GEMV against gpt-fast's int4 path ---------------------


def tinygemm_linear(weight_bf16: torch.Tensor, group_size: int = 128, inner_k_tiles: int = 8):
    """gpt-fast's int4 product (`WeightOnlyInt4Linear`): asymmetric 4-bit codes per group of
    `group_size`, packed by `_convert_weight_to_int4pack`, multiplied by `_weight_int4pack_mm`.
    Returns x -> y."""
    n, k = weight_bf16.shape
    w = weight_bf16.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16).float()
    zeros = lo + scales * 8  # tinygemm's zero: the value of code 8
    codes = ((w - lo) / scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(packed_bytes, inner_k_tiles)
    scales_and_zeros = (
        torch.stack([scales.reshape(n, -1), zeros.reshape(n, -1)], dim=2).transpose(0, 1).contiguous()
    ).to(torch.bfloat16)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)

    return linear, packed


def kernel_peer(llm) -> dict:
    """Per projection of the first decoder layer at M=1, in CUDA graphs with cold weights (ms)."""
    layer = llm.engine.runner.model.layers[0]
    results = {}
    for name, proj in zip(("qkv", "o", "gate_up", "down"), _projections(layer)):
        results[name] = row = _time_projection(proj)
        timed = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith("ms"))
        print(f"M=1 {name} {row['shape']}: {timed}", flush=True)
    return results


def _time_projection(proj) -> dict:
    from tensorjet.kernels.gemv import cold_copies, time_in_graph_ms
    from tensorjet.kernels.int4_linear import cold_weights, dequantize

    method = proj.method
    weight = method.weight
    x = torch.randn(1, weight.in_features, dtype=torch.bfloat16, device="cuda")
    dense = dequantize(weight, torch.bfloat16)
    row = {
        "shape": [weight.out_features, weight.in_features],
        "int4_bytes": sum(p.numel() * p.element_size() for p in proj.parameters()),
        "tensorjet_ms": time_in_graph_ms(
            lambda w: method.kernels.small_batch(x, w, None), cold_weights(weight)
        ),
        "bf16_cublas_ms": time_in_graph_ms(lambda w: torch.nn.functional.linear(x, w), cold_copies(dense)),
    }
    try:
        peers = [tinygemm_linear(d) for d in cold_copies(dense)]
        row["gpt_fast_int4_ms"] = time_in_graph_ms(lambda peer: peer[0](x), peers)
        row["gpt_fast_int4_bytes"] = peers[0][1].numel() * peers[0][1].element_size()
    except (RuntimeError, AttributeError) as error:  # an op this PyTorch build lacks
        row["gpt_fast_int4_error"] = str(error)[:200]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-8B")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=1000, help="requests of IN_OUT in / IN_OUT out")
    parser.add_argument("--in_out", type=int, default=1000, help="prompt and output tokens of the long run")
    parser.add_argument("--only", choices=sorted(WEIGHTS), default=None, help="one weight format alone")
    parser.add_argument("--skip_bench", action="store_true", help="skip the guide's bench command")
    parser.add_argument("--out", default="benchmarks/results/int4_gpu.json")
    args = parser.parse_args()
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
    for weights in [args.only] if args.only else ["bf16", "int4"]:
        run: dict = results["runs"].setdefault(weights, {})
        begin = time.perf_counter()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        llm = engine(args.model, weights, args.device)
        run["load_and_capture_s"] = time.perf_counter() - begin
        stats = llm.stats()
        run["weight_gb"] = stats["weight_bytes"] / 1e9
        run["weight_format"] = stats["weight_format"]
        step_bytes = bytes_per_decode_step(llm)
        run["decode_step_gb"] = step_bytes / 1e9
        run["decode_limit_ms"] = step_bytes / (copy * 1e12) * 1e3
        if on_gpu:  # compiles the Triton variants mixed steps use (prompts too long for a tiny model)
            warm_up(llm, seed=98)
        run["decode_b1"] = decode_latency(llm, 1, *((16, 8) if small else ()))
        run["decode_b64"] = decode_latency(llm, 4 if small else 64, *((16, 8) if small else ()))
        b1 = run["decode_b1"]["ms_per_step"]
        print(f"{weights}: b1 {b1:.3f} ms (limit {run['decode_limit_ms']:.3f})", flush=True)
        if weights == "int4" and on_gpu:
            run["kernel_peer_m1"] = kernel_peer(llm)
        run["throughput_long"] = throughput(llm, [(args.in_out, args.in_out)] * args.requests)
        if on_gpu:
            run["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"{weights}: {args.in_out}x{args.in_out} {run['throughput_long']['output_tok_s']:.0f} tok/s")
        llm.shutdown()
        del llm
        release_gpu_memory()
        out.write_text(json.dumps(results, indent=2))  # what is done so far survives a time limit
        if not args.skip_bench:
            lengths = (16, 8) if small else (128, 256)
            run["guide_bench"] = guide_bench(args.model, WEIGHTS[weights], args.device, *lengths)
            release_gpu_memory()
            out.write_text(json.dumps(results, indent=2))
    print_table(results, args.in_out)


def _cell(value, run: dict) -> str:
    try:
        return value(run)
    except KeyError:  # a part this run skipped
        return "-"


def print_table(results: dict, in_out: int) -> None:
    runs = results["runs"]
    where = f"{results['model']} (dummy) on {results['device']}, copy {results['copy_tbps']:.2f} TB/s"
    print(f"\nINT4 (W4A16, AWQ layout, g128) vs bf16 weights, {where}")
    rows = [
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
    print(f"{'':<30}" + "".join(f"{n:>12}" for n in names) + ("   int4/bf16" if len(names) == 2 else ""))
    for label, value in rows:
        cells = [_cell(value, runs[n]) for n in names]
        ratio = ""
        if len(names) == 2:
            try:
                ratio = f"{float(cells[1]) / float(cells[0]):>12.3f}"
            except (ValueError, ZeroDivisionError):
                ratio = ""
        print(f"{label:<30}" + "".join(f"{c:>12}" for c in cells) + ratio)
    peer = runs.get("int4", {}).get("kernel_peer_m1")
    if peer:
        print("\nbatch-1 products (us): tensorjet W4A16 GEMV / gpt-fast int4 (tinygemm) / bf16 cuBLAS")
        for name, row in peer.items():
            theirs = row.get("gpt_fast_int4_ms")
            cells = [row["tensorjet_ms"], theirs, row["bf16_cublas_ms"]]
            print(f"  {name:<8} {row['shape']!s:<14}" + "".join(
                f"{c * 1e3:>10.1f}" if c is not None else f"{'n/a':>10}" for c in cells))  # fmt: skip


if __name__ == "__main__":
    main()
