"""The matmuls of a Llama-3-8B forward pass, back to back for several seconds: TFLOP/s at the H200's
700 W power limit, against the same pass run once on a cool GPU.

Short benchmarks (gemm_sweep.py) time a matmul for microseconds, at whatever clock the GPU has then.
A serving workload runs the matmuls for seconds, and the board's power limit lowers the SM clock (HF's
workload: 1,610 MHz mean, against 1,980 at rest). This measures the rate the engine can count on:
32 layers of distinct weights (qkv, o_proj, gate_up, down_proj, cuBLAS through F.linear) and the LM
head, at 256 rows (a decode step) and 8,192 (a prefill step), sampling the SM clock and board power.

    python benchmarks/sustained_gemm.py [--seconds 6] [--out sustained_gemm.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from gemm_sweep import SHAPES  # noqa: E402  (benchmarks/ is on the path; name: (N, K, times per pass))

from tensorjet.bench.gpu_monitor import Sampler, nvml_probes


def forward_matmuls(rows: int, weights: list[torch.Tensor]):
    """One forward pass's matmuls at `rows` rows, in order (the LM head on every row, as a decode step
    does), and their FLOPs."""
    inputs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _, k, _ in SHAPES.values()}

    def run() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    return run, 2 * rows * sum(w.numel() for w in weights)


def measure(rows: int, seconds: float, weights: list[torch.Tensor]) -> dict:
    run, flops = forward_matmuls(rows, weights)
    run()
    torch.cuda.synchronize()
    time.sleep(2.0)  # let the clock recover from the previous measurement
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    cool_ms = start.elapsed_time(end)
    passes = 0
    with Sampler(nvml_probes(torch.device("cuda")), interval_s=0.05) as sampler:
        began = time.perf_counter()
        start.record()
        while time.perf_counter() - began < seconds:
            for _ in range(4):
                run()
            passes += 4
            torch.cuda.synchronize()  # keeps the queue short, so the loop stops near `seconds`
        end.record()
        torch.cuda.synchronize()
    sustained_ms = start.elapsed_time(end) / passes

    def mean(key: str) -> float | None:
        samples = sampler.samples.get(key)
        return sum(samples) / len(samples) if samples else None

    return {
        "rows": rows,
        "cool_ms": cool_ms,
        "cool_tflops": flops / cool_ms / 1e9,
        "sustained_ms": sustained_ms,
        "sustained_tflops": flops / sustained_ms / 1e9,
        "passes": passes,
        "sm_clock_mhz_mean": mean("gpu_sm_clock_mhz"),
        "power_w_mean": mean("gpu_power_w"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rows", default="256,8192")
    parser.add_argument("--out", default="sustained_gemm.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    # Distinct weights for every layer: qkv, o_proj, gate_up, down 32 times over, then the LM head.
    per_layer = [(n, k) for n, k, times in SHAPES.values() if times > 1]
    layers = max(times for _, _, times in SHAPES.values())
    shapes = per_layer * layers + [(n, k) for n, k, times in SHAPES.values() if times == 1]
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes]
    results = [measure(int(r), args.seconds, weights) for r in args.rows.split(",")]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)
    print(f"\n{'rows':>6}{'cool ms':>10}{'TFLOP/s':>9}{'sustained':>11}{'TFLOP/s':>9}{'SM MHz':>8}{'W':>6}")
    for r in results:
        print(
            f"{r['rows']:>6}{r['cool_ms']:>10.2f}{r['cool_tflops']:>9.0f}{r['sustained_ms']:>11.2f}"
            f"{r['sustained_tflops']:>9.0f}{r['sm_clock_mhz_mean'] or 0:>8.0f}{r['power_w_mean'] or 0:>6.0f}"
        )


if __name__ == "__main__":
    main()
