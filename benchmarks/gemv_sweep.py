"""Batch-1 GEMV configurations on the GPU, per Llama-3-8B projection: time, TB/s, and cuBLAS beside.

The fused batch-1 layer (`tensorjet/kernels/fused_gemv.py`) reads a layer's 436 MB at ~3.6 TB/s
where the copy rate would take 103 us instead of 121; that gap is what separates batch-1 decode from
its 4.3 ms goal. This sweeps the FMA GEMV's tile shape, warps and pipelining depth for each
projection with the fusion it runs, timed as the engine times them (inside a CUDA graph, weights
cycled so every read comes from HBM), against cuBLAS's plain `F.linear` and the 4.25 TB/s copy rate.

    python benchmarks/gemv_sweep.py [--out $OUT/gemv_sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from tensorjet.kernels.fused_gemv import FusedGemvConfig, fused_gemv
from tensorjet.kernels.gemv import cold_copies, time_in_graph_ms

COPY_TBPS = 4.25
HIDDEN, INTERMEDIATE, Q, KV = 4096, 14336, 4096, 1024
PROJECTIONS = {  # name: (output rows, input size, fusion), as `LlamaDecoderLayer.forward_fused` runs them
    "qkv_proj": (Q + 2 * KV, HIDDEN, dict(norm=True)),
    "o_proj": (HIDDEN, Q, dict(residual=True)),
    "gate_up_proj": (2 * INTERMEDIATE, HIDDEN, dict(norm=True, silu_mul=True)),
    "down_proj": (HIDDEN, INTERMEDIATE, dict(residual=True)),
}
# 32 configurations: each compiles once per fusion variant (~1 s), so the sweep takes ~3 minutes.
CONFIGS = [
    FusedGemvConfig(block_n, block_k, warps, stages)
    for block_n, block_k, warps, stages in itertools.product(
        (2, 4, 8, 16), (512, 1024, 2048), (4, 8), (None, 4)
    )
    if 4096 <= block_n * block_k <= 16384  # 4,096-16,384 fp32 partial sums per program
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/gemv_sweep.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv_sweep.py times GPU kernels inside CUDA graphs: it needs a CUDA GPU")
    torch.manual_seed(0)
    results = {}
    rows = []
    for name, (n, k, fusion) in PROJECTIONS.items():
        weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        weights = cold_copies(weight)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        options = dict(
            norm_weight=torch.ones(k, device="cuda", dtype=torch.bfloat16) if fusion.get("norm") else None,
            eps=1e-5,
            residual=torch.zeros(1, n, device="cuda", dtype=torch.bfloat16)
            if fusion.get("residual")
            else None,
            silu_mul=fusion.get("silu_mul", False),
        )
        mb = weight.numel() * weight.element_size() / 1e6
        cublas_us = time_in_graph_ms(lambda w, x=x: torch.nn.functional.linear(x, w), weights) * 1e3
        timings = {}
        for config in CONFIGS:
            try:
                launch = lambda w, c=config, x=x, o=options: fused_gemv(x, w, None, c, **o)  # noqa: E731
                us = time_in_graph_ms(launch, weights) * 1e3
            except Exception as error:  # e.g. out of registers or shared memory for this tile
                timings[str(config)] = repr(error)[:80]
                continue
            timings[str(config)] = us
        best = min((v, c) for c, v in timings.items() if isinstance(v, float))
        results[name] = {
            "weight_mb": mb,
            "cublas_us": cublas_us,
            "copy_rate_us": mb / COPY_TBPS,
            "configs": timings,
        }
        rows.append((name, mb, mb / COPY_TBPS, cublas_us, best[0], best[1]))
        del weights, weight
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    header = ("projection", "MB", "copy-rate us", "cuBLAS us", "best fused us", "TB/s", "config")
    print("\n{:14} {:>7} {:>12} {:>10} {:>13} {:>6}  {}".format(*header))
    for name, mb, limit_us, cublas_us, best_us, config in rows:
        values = (name, mb, limit_us, cublas_us, best_us, mb / best_us, config)
        print("{:14} {:7.1f} {:12.1f} {:10.1f} {:13.1f} {:6.2f}  {}".format(*values))


if __name__ == "__main__":
    main()
