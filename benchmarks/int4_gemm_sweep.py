"""Every INT4 GEMM tile against bf16 cuBLAS and tinygemm, per Llama-3-8B projection and batch size, on one
GPU: which way of unpacking the codes (tensorjet's "slices", "spread") wins where, and by how
much the best misses the bytes it reads at the copy rate.

Beside tensorjet's kernel it times a probe in the other common layout, the codes packed along K into
int32 words stored [K / 8, N] (N contiguous, as GPTQ and AutoAWQ-style Triton kernels read them): a
[BLOCK_K, BLOCK_N] tile loaded with each word repeated for its eight rows, shifted per row, x the
MMA's first operand. The probe lives here, not in the library: it tells whether that layout is worth
a second copy of the codes.

    python benchmarks/int4_gemm_sweep.py [--rows 16,32,64,128,256] [--json FILE]
    python benchmarks/int4_gemm_sweep.py --check   # the tiles and the probe against the reference

Times are per launch inside CUDA graphs, codes read from HBM (cold copies), K split to fill the SMs
as the engine splits it. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, replace

import torch
import triton
import triton.language as tl
from weight_formats import copy_rate_tbps

from tensorjet.kernels.gemv import cold_copies, time_in_graph_ms
from tensorjet.kernels.int4_linear import GEMM_CANDIDATES, _split_for, cold_weights, int4_gemm, int4_matmul
from tensorjet.kernels.int4_reference import Int4Weight, dequantize, int4_linear_reference
from tensorjet.kernels.int4_tinygemm import pack_tinygemm, tinygemm_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) of the [K / 8, N] probe
PROBE_CONFIGS = [
    (16, 64, 128, 1, 4, 3),
    (16, 64, 128, 4, 4, 3),
    (32, 64, 128, 2, 4, 3),
    (32, 128, 128, 1, 4, 3),
    (64, 64, 128, 1, 4, 3),
    (64, 128, 64, 1, 4, 4),
    (64, 128, 128, 1, 8, 3),
    (64, 128, 128, 2, 8, 3),
    (128, 128, 64, 1, 8, 3),
    (128, 64, 128, 1, 4, 3),
]


@triton.jit
def _kn_probe_kernel(
    x_ptr,
    qw_ptr,
    scale_ptr,
    zero_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_ym,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y[M, N] (+)= x @ dequant(W)^T with the codes stored [K / 8, N]; SPLIT_K > 1 adds fp32 partial
    sums atomically into a zeroed y."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(K // (BLOCK_K * SPLIT_K)):
        k0 = (i * SPLIT_K + tl.program_id(2)) * BLOCK_K
        cols = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None], other=0.0)
        words = tl.load(qw_ptr + (cols // 8)[:, None] * stride_qk + offs_n[None, :])
        codes = (words >> ((cols % 8) * 4)[:, None]) & 0xF
        group = k0 // GROUP
        scale = tl.load(scale_ptr + group * stride_sg + offs_n).to(tl.float32)
        zero = tl.load(zero_ptr + group * stride_sg + offs_n).to(tl.float32)
        w = (codes.to(tl.float32) - zero[None, :]) * scale[None, :]
        acc = tl.dot(x, w.to(x.dtype), acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:
        tl.atomic_add(y_ptrs, acc, mask=m_mask[:, None], sem="relaxed")


def kn_layout(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight` (no act order) as the probe reads it: codes packed along K into int32 [K / 8, N], scales
    and zero points [groups, N]."""
    shifts = torch.arange(8, device=weight.qweight.device, dtype=torch.int32) * 4
    codes = (weight.qweight[:, :, None] >> shifts) & 0xF  # [N, K / 8, 8]: column 8i + j
    packed = (codes.permute(1, 2, 0) << shifts[None, :, None]).sum(1, dtype=torch.int32)  # [K / 8, N]
    zeros = weight.zeros if weight.zeros is not None else torch.full_like(weight.scales, 8)
    return packed.contiguous(), weight.scales.t().contiguous(), zeros.t().contiguous().to(weight.scales.dtype)


def kn_probe(x: torch.Tensor, kn: tuple, config: tuple) -> torch.Tensor:
    packed, scales, zeros = kn
    block_m, block_n, block_k, split_k, warps, stages = config
    m, k = x.shape
    n = packed.shape[1]
    y = (torch.zeros if split_k > 1 else torch.empty)(
        (m, n), device=x.device, dtype=torch.float32 if split_k > 1 else x.dtype
    )
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _kn_probe_kernel[grid](
        x, packed, scales, zeros, y, m, n, k, x.stride(0), packed.stride(0), scales.stride(0), y.stride(0),
        GROUP=GROUP, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def random_weight(n: int, k: int, device: str, dtype: torch.dtype) -> Int4Weight:
    words = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(n, k // GROUP, device=device) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8, device=device)
    return Int4Weight(words, scales, zeros, None, GROUP, k)


def check(device: str) -> None:
    """Every GEMM tile (K split as the engine splits it at each size) and the probe (every config, split
    or not) against the reference on small shapes."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weight = random_weight(256, 512, device, dtype)  # (the probe does not mask N or K)
    for m in (17, 40, 64, 130):
        x = torch.randn(m, 512, device=device, dtype=dtype)
        expected = int4_linear_reference(x, weight).float()
        for config in GEMM_CANDIDATES:
            got = int4_gemm(x, weight, config=config).float()
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    kn = kn_layout(weight)
    x = torch.randn(40, 512, device=device, dtype=dtype)
    expected = int4_linear_reference(x, weight).float()
    for config in PROBE_CONFIGS:
        got = kn_probe(x, kn, replace_split(config, min(config[3], 2))).float()
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    print(
        f"{len(GEMM_CANDIDATES)} GEMM tiles and the probe's {len(PROBE_CONFIGS)} configs match the "
        f"reference on {device}"
    )


def replace_split(config: tuple, split_k: int) -> tuple:
    return (*config[:3], split_k, *config[4:])


def sweep(rows: list[int]) -> dict:
    device = "cuda"
    dtype = torch.bfloat16
    copy_rate = copy_rate_tbps(device) * 1e12  # bytes read + written per second
    results = {"copy_rate_bytes_per_s": copy_rate, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        weight = random_weight(n, k, device, dtype)
        weights = cold_weights(weight)
        dense = cold_copies(dequantize(weight, dtype))
        tiny = [pack_tinygemm(w) for w in weights[:2]]
        kn = [kn_layout(w) for w in weights]
        int4_bytes = n * k // 2 + 3 * n * (k // GROUP)
        per_shape = results["shapes"][name] = {
            "n": n,
            "k": k,
            "limit_us": int4_bytes / copy_rate * 1e6,
            "rows": {},
        }
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=dtype)
            timed = {"cublas_bf16": time_in_graph_ms(lambda w, x=x: torch.nn.functional.linear(x, w), dense)}
            timed["tinygemm"] = time_in_graph_ms(lambda w, x=x: tinygemm_linear(x, w), tiny)
            for config in GEMM_CANDIDATES:
                split = replace(config, split_k=_split_for(x, weight, config))
                tile = f"{config.block_m}x{config.block_n}x{config.block_k}"
                label = f"{config.unpack}:{tile}w{config.num_warps}"
                timed[label] = time_in_graph_ms(
                    lambda w, c=split, x=x: int4_matmul(x, w, config=c, max_rows=512), weights
                )
            for config in PROBE_CONFIGS:
                label = "kn:{}x{}x{}s{}w{}".format(*config[:5])
                timed[label] = time_in_graph_ms(lambda w, c=config, x=x: kn_probe(x, w, c), kn)
            per_shape["rows"][m] = {label: ms * 1e3 for label, ms in timed.items()}
    return results


def print_table(results: dict) -> None:
    families = ("slices", "spread", "kn")
    print(
        f"\ncopy rate {results['copy_rate_bytes_per_s'] / 1e12:.2f} TB/s; "
        "times in us (the best tile of each family)"
    )
    print(
        f"{'shape':<8}{'M':>5}{'int4 bytes':>11}{'cuBLAS bf16':>12}{'tinygemm':>10}"
        + "".join(f"{f:>9}" for f in families)
        + "  best tile"
    )
    for name, shape in results["shapes"].items():
        for m, timed in shape["rows"].items():
            best = {
                f: min((t for label, t in timed.items() if label.startswith(f + ":")), default=float("nan"))
                for f in families
            }
            ours = {label: t for label, t in timed.items() if label.split(":")[0] in families[:-1]}
            best_label = min(ours, key=ours.get)
            print(
                f"{name:<8}{m:>5}{shape['limit_us']:>11.1f}{timed['cublas_bf16']:>12.1f}{timed['tinygemm']:>10.1f}"
                + "".join(f"{best[f]:>9.1f}" for f in families)
                + f"  {best_label}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="16,32,64,128,256")
    parser.add_argument("--json", default=None)
    parser.add_argument("--check", action="store_true", help="check the tiles and the probe, nothing timed")
    args = parser.parse_args()
    if args.check:
        check("cuda" if torch.cuda.is_available() else "cpu")
        return
    check("cuda")
    results = sweep([int(r) for r in args.rows.split(",")])
    results |= {"device": torch.cuda.get_device_name(), "platform": platform.platform()}
    results["candidates"] = [asdict(c) for c in GEMM_CANDIDATES]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
