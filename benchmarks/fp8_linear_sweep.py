"""FP8 W8A8 linear products on the GPU, per Llama-3-8B projection and batch size, against bf16 cuBLAS.

For each projection (and the bf16 LM head, as the reference for a weight that stays bf16) and each M:
- `bf16`: `F.linear` on the bf16 weight;
- `scaled_mm`: `scaled_mm_linear` (per-token quantization in one launch + torch._scaled_mm);
- `gemv` (M <= 16): `fp8_gemv`, the fastest of its candidate tiles;
- `gemm` (M >= 16): `fp8_gemm`, the fastest of its tiles up to 256 rows, its default tile above;
- `fused` (M = 1): `fp8_fused_gemv` with the fusion the decode layer runs it with (norm before qkv and
  gate|up, residual after o and down, SiLU-and-multiply after gate|up), fastest tile; `bf16-fused`
  beside it is the bf16 `fused_gemv` with the same fusion.
Each is timed as the engine times its kernels (inside a CUDA graph, weight copies cycled so every read
comes from HBM) and checked against `fp8_linear_reference` on the same GPU (max |error| / max |ref|).
The table gives microseconds, GB/s of weight read, and that rate as a fraction of a device-to-device
copy's (bytes read + written per second) measured in the same run.

With --fused-tiles it sweeps instead the fused batch-1 GEMV's tiles (FMA and tensor-core, 31 of them)
for each projection with its fusion, as benchmarks/gemv_sweep.py does for the bf16 one; the
candidates in `tensorjet.kernels.fp8_fused_gemv` come from such a run.

    python benchmarks/fp8_linear_sweep.py [--out $OUT/fp8_linear_sweep.json] [--m 1,16,256]
    python benchmarks/fp8_linear_sweep.py --fused-tiles [--out $OUT/fp8_fused_sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from tensorjet.kernels.fp8_fused_gemv import CANDIDATES as FUSED_CANDIDATES
from tensorjet.kernels.fp8_fused_gemv import Fp8FusedGemvConfig, fp8_fused_gemv
from tensorjet.kernels.fp8_linear import (
    CANDIDATES,
    GEMM_CONFIGS,
    GEMM_MAX_M,
    MAX_M,
    fp8_gemm,
    fp8_gemv,
    gemm_config,
    scaled_mm_linear,
)
from tensorjet.kernels.fp8_reference import fp8_linear_reference, quantize_weight_per_channel
from tensorjet.kernels.fused_gemv import CANDIDATES as BF16_FUSED_CANDIDATES
from tensorjet.kernels.fused_gemv import fused_gemv
from tensorjet.kernels.gemv import cold_copies, time_in_graph_ms

HIDDEN, INTERMEDIATE, Q, KV, VOCAB = 4096, 14336, 4096, 1024, 128256
PROJECTIONS = {  # name: (output rows, input size, fusion at batch 1), as the decoder layer runs them
    "qkv_proj": (Q + 2 * KV, HIDDEN, dict(norm=True)),
    "o_proj": (HIDDEN, Q, dict(residual=True)),
    "gate_up_proj": (2 * INTERMEDIATE, HIDDEN, dict(norm=True, silu_mul=True)),
    "down_proj": (HIDDEN, INTERMEDIATE, dict(residual=True)),
    "lm_head": (VOCAB, HIDDEN, None),  # stays bf16: timed with F.linear only
}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
# --fused-tiles: FMA tiles of 2,048-16,384 partial sums (8 warps from 8,192 up), tensor-core tiles of
# 64 or 128 weight rows (some exceed the shared memory: reported, skipped).
FUSED_TILES = [
    Fp8FusedGemvConfig(block_n, block_k, warps)
    for block_n, block_k, warps in itertools.product((4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8))
    if 2048 <= block_n * block_k <= 16384 and (warps == 4 or block_n * block_k >= 8192)
]
FUSED_TILES += [
    Fp8FusedGemvConfig(64, block_k, 4, stages, tensor_cores=True)
    for block_k, stages in itertools.product((128, 256, 512), (3, 4, 6))
]
FUSED_TILES += [
    Fp8FusedGemvConfig(128, 256, 4, 3, tensor_cores=True),
    Fp8FusedGemvConfig(128, 256, 8, 4, tensor_cores=True),
    Fp8FusedGemvConfig(64, 256, 8, 4, tensor_cores=True),
]


def copy_rate_gbps(nbytes: int = 2**30) -> float:
    """A device-to-device copy's bytes read + written per second, in GB/s (best of 5)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(6):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return 2 * nbytes / best / 1e6


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def fastest(configs, launch, weights) -> tuple[float, object]:
    """(us, config) of the fastest config; a config that fails to compile is skipped."""
    timed = []
    for i, config in enumerate(configs):
        try:
            timed.append((time_in_graph_ms(lambda w, c=config: launch(c, w), weights) * 1e3, i))
        except Exception as error:  # e.g. out of shared memory for this tile
            print(f"  {config}: {repr(error)[:100]}")
    us, best = min(timed)
    return us, configs[best]


def fusion_args(fusion: dict, n: int, k: int) -> dict:
    return dict(
        norm_weight=torch.ones(k, device="cuda", dtype=torch.bfloat16) if fusion.get("norm") else None,
        eps=1e-5,
        residual=torch.zeros(1, n, device="cuda", dtype=torch.bfloat16) if fusion.get("residual") else None,
        silu_mul=fusion.get("silu_mul", False),
    )


def sweep_projection(name: str, n: int, k: int, fusion: dict | None, batches) -> list[dict]:
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    bf16_weights = cold_copies(w)
    rows = []

    def record(kernel: str, m: int, us: float, weight_bytes: int, err: float | None, config: object = ""):
        rows.append(dict(projection=name, m=m, kernel=kernel, us=us, weight_mb=weight_bytes / 1e6,
                         gbps=weight_bytes / us / 1e3, max_err=err, config=str(config)))  # fmt: skip
        print(f"{name:13} M={m:5} {kernel:10} {us:9.1f} us  {err}  {config}", flush=True)

    bf16_bytes = w.numel() * 2
    if fusion is None:
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = time_in_graph_ms(lambda wt, x=x: F.linear(x, wt), bf16_weights) * 1e3
            record("bf16", m, us, bf16_bytes, None)
        return rows

    wq, ws = quantize_weight_per_channel(w)
    fp8_weights = cold_copies(wq)
    fp8_bytes = wq.numel()
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = fp8_linear_reference(x, wq, ws)
        us = time_in_graph_ms(lambda wt, x=x: F.linear(x, wt), bf16_weights) * 1e3
        record("bf16", m, us, bf16_bytes, None)
        us = time_in_graph_ms(lambda wt, x=x: scaled_mm_linear(x, wt, ws), fp8_weights) * 1e3
        record("scaled_mm", m, us, fp8_bytes, max_error(scaled_mm_linear(x, wq, ws), ref))
        if m <= MAX_M:
            us, config = fastest(CANDIDATES, lambda c, wt, x=x: fp8_gemv(x, wt, ws, config=c), fp8_weights)
            err = max_error(fp8_gemv(x, wq, ws, config=config), ref)
            record("gemv", m, us, fp8_bytes, err, config)
        if m >= MAX_M:
            configs = [c for _, c in GEMM_CONFIGS] if m <= GEMM_MAX_M else [gemm_config(m)]
            us, config = fastest(configs, lambda c, wt, x=x: fp8_gemm(x, wt, ws, config=c), fp8_weights)
            record("gemm", m, us, fp8_bytes, max_error(fp8_gemm(x, wq, ws), ref), config)
        if m == 1:
            err = max_error(fp8_fused_gemv(x, wq, ws), ref)
            options = fusion_args(fusion, n // 2 if fusion.get("silu_mul") else n, k)
            launch = lambda c, wt, x=x, o=options: fp8_fused_gemv(x, wt, ws, None, None, c, **o)  # noqa: E731
            us, config = fastest(FUSED_CANDIDATES, launch, fp8_weights)
            record("fused", m, us, fp8_bytes, err, config)
            launch = lambda c, wt, x=x, o=options: fused_gemv(x, wt, None, c, **o)  # noqa: E731
            us, config = fastest(BF16_FUSED_CANDIDATES, launch, bf16_weights)
            record("bf16-fused", m, us, bf16_bytes, None, config)
    return rows


def sweep_fused_tiles(copy_gbps: float) -> dict:
    """Every tile of FUSED_TILES per projection at M=1 with its fusion: {projection: [(us, tile)]},
    fastest first; the best few of each are printed."""
    results = {}
    for name, (n, k, fusion) in PROJECTIONS.items():
        if fusion is None:
            continue
        wq, ws = quantize_weight_per_channel(torch.randn(n, k, device="cuda") / k**0.5)
        weights = cold_copies(wq)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        options = fusion_args(fusion, n // 2 if fusion.get("silu_mul") else n, k)
        launch = lambda t, wt, x=x, ws=ws, o=options: fp8_fused_gemv(x, wt, ws, None, None, t, **o)  # noqa: E731
        timed = []
        for tile in FUSED_TILES:
            try:
                timed.append((time_in_graph_ms(partial(launch, tile), weights) * 1e3, str(tile)))
            except Exception as error:  # out of shared memory for this tile
                print(f"  {tile}: {repr(error)[:100]}")
        timed.sort()
        results[name] = timed
        print(f"{name}: {wq.numel() / 1e6:.1f} MB, {wq.numel() / copy_gbps / 1e3:.1f} us at the copy rate")
        for us, tile in timed[:6]:
            print(f"  {us:6.1f} us  {wq.numel() / us / 1e3 / copy_gbps:.2f} of copy  {tile}")
        del weights, wq
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    default_out = Path(os.environ["OUT"]) / "fp8_linear_sweep.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--m", default=",".join(map(str, BATCHES)), help="batch sizes, comma-separated")
    parser.add_argument("--projections", default=",".join(PROJECTIONS))
    parser.add_argument("--fused-tiles", action="store_true", help="sweep the fused GEMV's tiles instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_linear_sweep.py times GPU kernels inside CUDA graphs: it needs a CUDA GPU")
    torch.manual_seed(0)
    batches = [int(m) for m in args.m.split(",")]
    copy_gbps = copy_rate_gbps()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.0f} GB/s (read + write)")
    if args.fused_tiles:
        results = sweep_fused_tiles(copy_gbps)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            report = dict(device=torch.cuda.get_device_name(), copy_gbps=copy_gbps, tiles=results)
            args.out.write_text(json.dumps(report, indent=1))
        return
    rows = []
    for name in args.projections.split(","):
        n, k, fusion = PROJECTIONS[name]
        rows += sweep_projection(name, n, k, fusion, batches)
        torch.cuda.empty_cache()
    for row in rows:
        row["copy_fraction"] = row["gbps"] / copy_gbps
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = dict(device=torch.cuda.get_device_name(), copy_gbps=copy_gbps, rows=rows)
        args.out.write_text(json.dumps(report, indent=1))
    header = ("projection", "M", "kernel", "us", "GB/s", "of copy", "max err", "config")
    print("\n{:13} {:>5} {:10} {:>9} {:>7} {:>7} {:>8}  {}".format(*header))
    for r in rows:
        err = "-" if r["max_err"] is None else f"{r['max_err']:.1e}"
        values = (
            r["projection"],
            r["m"],
            r["kernel"],
            r["us"],
            r["gbps"],
            r["copy_fraction"],
            err,
            r["config"],
        )
        print("{:13} {:5} {:10} {:9.1f} {:7.0f} {:7.2f} {:>8}  {}".format(*values))


if __name__ == "__main__":
    main()
