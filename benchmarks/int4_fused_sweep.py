"""Every candidate of the fused batch-1 INT4 GEMV (`tensorjet.kernels.int4_fused_gemv`), tensor-core and
FMA tiles, per Llama-3 8B and 70B projection with the fusion the decode layer gives it (RMSNorm before
q|k|v, RMSNorm and SiLU-and-multiply around gate|up, the residual add after o and down), beside the
unfused one-row products it competes with: tensorjet's INT4 GEMV and tinygemm (gpt-fast's kernel).
Each FMA tile is checked against the reference product on the GPU first.

    python benchmarks/int4_fused_sweep.py [--models 8b,70b] [--json FILE]

Times are per launch inside CUDA graphs, codes read from HBM (cold copies); bytes are the codes,
scales and zero points at the copy rate measured in the same run. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from int4_gemm_sweep import random_weight
from weight_formats import copy_rate_tbps

from tensorjet.kernels.gemv import time_in_graph_ms
from tensorjet.kernels.int4_fused_gemv import candidates_for, int4_fused_gemv
from tensorjet.kernels.int4_linear import cold_weights, select_int4_gemv
from tensorjet.kernels.int4_reference import int4_linear_reference
from tensorjet.kernels.int4_tinygemm import pack_tinygemm, tinygemm_linear

# (rows, with gate and up together; columns; the fusion the decode layer gives the projection)
SHAPES = {
    "8b": {
        "qkv": (6144, 4096, "norm"),
        "o": (4096, 4096, "residual"),
        "gate_up": (28672, 4096, "norm_silu"),
        "down": (4096, 14336, "residual"),
    },
    "70b": {
        "qkv": (10240, 8192, "norm"),
        "o": (8192, 8192, "residual"),
        "gate_up": (57344, 8192, "norm_silu"),
        "down": (8192, 28672, "residual"),
    },
}


def fusion_arguments(k: int, n: int, fusion: str, like: torch.Tensor) -> dict:
    """`int4_fused_gemv`'s keyword arguments for a projection of `n` output rows with `fusion`."""
    silu = fusion == "norm_silu"
    return dict(
        norm_weight=torch.ones(k, dtype=like.dtype, device=like.device) if fusion != "residual" else None,
        eps=1e-5,
        residual=torch.zeros(1, n, dtype=like.dtype, device=like.device) if fusion == "residual" else None,
        silu_mul=silu,
    )


def check_fma_tiles(x: torch.Tensor, weight) -> float:
    """The largest error of the FMA tiles' plain product against the reference, relative to its size."""
    ref = int4_linear_reference(x, weight).float()
    errors = [
        ((int4_fused_gemv(x, weight, None, c).float() - ref).abs().max() / ref.abs().max()).item()
        for c in candidates_for(weight)
        if c.fma
    ]
    return max(errors)


def sweep_projection(n: int, k: int, fusion: str, copy_tbps: float) -> dict:
    weight = random_weight(n, k, "cuda", torch.bfloat16)
    weights = cold_weights(weight)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out_rows = n // 2 if fusion == "norm_silu" else n
    options = fusion_arguments(k, out_rows, fusion, x)
    stored = weight.qweight.numel() * 4 + weight.scales.numel() * 2 + weight.zeros.numel()
    row: dict = {"bytes_us": stored / (copy_tbps * 1e6), "fma_max_error": check_fma_tiles(x, weight)}
    row["fused_us"] = {
        str(c): time_in_graph_ms(lambda w, c=c: int4_fused_gemv(x, w, None, c, **options), weights) * 1e3
        for c in candidates_for(weight)
    }
    _, timings = select_int4_gemv(weight, None)
    row["gemv_us"] = timings["gemv_m1"] * 1e3
    tinygemm = [pack_tinygemm(w) for w in weights]
    row["tinygemm_us"] = time_in_graph_ms(lambda w: tinygemm_linear(x, w), tinygemm) * 1e3
    del weight, weights, tinygemm
    torch.cuda.empty_cache()
    return row


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, copy {results['copy_tbps']:.2f} TB/s; batch-1 us per projection")
    header = f"{'projection':<12} {'bytes':>6} {'fused MMA':>9} {'fused FMA':>9} {'GEMV':>6} {'tinygemm':>8}"
    header += "  FMA tile"
    print(header + "\n" + "-" * len(header))
    for name, row in results["projections"].items():
        mma = min(t for c, t in row["fused_us"].items() if "fma=True" not in c)
        fma, tile = min((t, c) for c, t in row["fused_us"].items() if "fma=True" in c)
        cells = f"{row['bytes_us']:6.1f} {mma:9.1f} {fma:9.1f} {row['gemv_us']:6.1f}"
        cells += f" {row['tinygemm_us']:8.1f}"
        print(f"{name:<12} {cells}  {tile.removeprefix('Int4FusedGemvConfig')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="8b,70b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    copy = copy_rate_tbps("cuda")
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "platform": platform.platform(),
        "copy_tbps": copy,
        "projections": {},
    }
    for model in args.models.split(","):
        for name, (n, k, fusion) in SHAPES[model].items():
            results["projections"][f"{model}_{name}"] = sweep_projection(n, k, fusion, copy)
            print(f"{model} {name} done", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
