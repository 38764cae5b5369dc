"""INT4 (W4A16) weights against bf16 weights on one GPU, in one run: Llama-3-8B shapes, dummy weights.

- the copy rate of this GPU (a 2 GiB device-to-device copy: bytes read + written per second);
- batch-1 decode (128-token prompt, 256 new tokens): ms per token, against its limit, the bytes a step
  reads (every linear layer's codes, scales, zero points + the bf16 LM head) / the copy rate;
- each Llama-3-8B projection's batch-1 product alone, in CUDA graphs with cold weights: tensorjet's
  W4A16 GEMV (the tile kernel selection chose) against gpt-fast's int4 path (PyTorch's tinygemm
  `_weight_int4pack_mm`, group 128, the same shapes) and bf16 cuBLAS;
- the peer's whole batch-1 decode in the same run, once the engines are gone: gpt-fast's compiled
  decode step with its int4 linears (`benchmarks/gpt_fast_peer.py`), for a model it has a preset of;
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
import json
from pathlib import Path

import torch
from gpt_fast_peer import measure as gpt_fast_decode
from weight_formats import add_arguments, print_table, projections, run

FORMATS = {"bf16": "bfloat16", "int4": "int4_awq"}
# The models gpt-fast's peer has the shapes of
PEER_PRESETS = {"meta-llama/Meta-Llama-3-8B": "llama-3-8b", "meta-llama/Meta-Llama-3-70B": "llama-3-70b"}


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
    for name, proj in zip(("qkv", "o", "gate_up", "down"), projections(layer)):
        results[name] = row = _time_projection(proj)
        timed = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith("ms"))
        print(f"M=1 {name} {row['shape']}: {timed or row['skipped']}", flush=True)
    return results


def _time_projection(proj) -> dict:
    method = proj.method
    weight = method.weight
    x = torch.randn(1, weight.in_features, dtype=torch.bfloat16, device="cuda")
    try:
        return _time_against_peers(method, weight, x)
    except torch.OutOfMemoryError:  # the engine's KV cache leaves no room for the peers' weight copies
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        return {
            "shape": [weight.out_features, weight.in_features],
            "skipped": f"out of memory for the peers' copies of the weight ({free / 1e9:.1f} GB free)",
        }


def _time_against_peers(method, weight, x: torch.Tensor) -> dict:
    from tensorjet.kernels.gemv import cold_copies, time_in_graph_ms
    from tensorjet.kernels.int4_linear import cold_weights
    from tensorjet.kernels.int4_reference import dequantize
    from tensorjet.kernels.int4_tinygemm import pack_tinygemm
    from tensorjet.kernels.int4_tinygemm import tinygemm_linear as int4_tinygemm_linear

    dense = dequantize(weight, torch.bfloat16)
    if method.tinygemm is not None and method.tinygemm_max_rows >= 1:  # what one-row steps run
        ours = [pack_tinygemm(w) for w in cold_weights(weight)]
        tensorjet_ms = time_in_graph_ms(lambda w: int4_tinygemm_linear(x, w), ours)
    else:
        tensorjet_ms = time_in_graph_ms(
            lambda w: method.kernels.small_batch(x, w, None), cold_weights(weight)
        )
    row = {
        "shape": [weight.out_features, weight.in_features],
        "int4_bytes": sum(
            t.numel() * t.element_size()
            for t in (weight.qweight, weight.scales, weight.zeros)
            if t is not None
        ),
        "tensorjet_kernel": "tinygemm" if method.tinygemm is not None else "triton",
        "tensorjet_ms": tensorjet_ms,
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
    add_arguments(parser, FORMATS, out="benchmarks/results/int4_gpu.json")
    args = parser.parse_args()

    def extra(name: str, llm, part: dict) -> None:
        if name == "int4" and args.device.startswith("cuda"):
            part["kernel_peer_m1"] = kernel_peer(llm)

    results = run(args, FORMATS, extra)
    preset = PEER_PRESETS.get(args.model)
    if args.device.startswith("cuda") and not args.bench_only and preset is not None:
        results["gpt_fast_int4_decode"] = gpt_fast_decode(preset, "int4", torch.device(args.device))
        Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results, "INT4 (W4A16, AWQ layout, g128) vs bf16 weights", args.in_out)
    print_kernel_peer(results["runs"])
    print_decode_peer(results)


def print_kernel_peer(runs: dict) -> None:
    peer = runs.get("int4", {}).get("kernel_peer_m1")
    if peer:
        print("\nbatch-1 products (us): tensorjet's one-row kernel / gpt-fast int4 (tinygemm) / bf16 cuBLAS")
        for name, row in peer.items():
            if "skipped" in row:
                print(f"  {name:<8} {row['shape']!s:<14} skipped: {row['skipped']}")
                continue
            theirs = row.get("gpt_fast_int4_ms")
            cells = [row["tensorjet_ms"], theirs, row["bf16_cublas_ms"]]
            print(f"  {name:<8} {row['shape']!s:<14}" + "".join(
                f"{c * 1e3:>10.1f}" if c is not None else f"{'n/a':>10}" for c in cells))  # fmt: skip


def print_decode_peer(results: dict) -> None:
    peer = results.get("gpt_fast_int4_decode")
    ours = results["runs"].get("int4", {}).get("decode_b1")
    if peer and ours:
        theirs, mine = peer["ms_per_token"], ours["ms_per_step"]
        verdict = f"{theirs / mine:.2f}x faster" if mine <= theirs else f"{mine / theirs:.2f}x slower"
        print(
            f"\nbatch-1 decode, same run: tensorjet int4 {mine:.3f} ms/token, gpt-fast int4 (compiled) "
            f"{theirs:.3f} ms/token: tensorjet {verdict}"
        )


if __name__ == "__main__":
    main()
