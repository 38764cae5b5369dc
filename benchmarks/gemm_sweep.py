"""Llama-3-8B matmul shapes at small M (bf16): can anything beat torch's default cuBLAS `F.linear`?

At M=256 rows cuBLAS stays well under the 782 TFLOP/s it reaches on large bf16 GEMMs (o_proj ~450,
gate_up ~650), partly through wave quantisation on 132 SMs (o_proj's 256x4096 output is 2x32 tiles of
128x128) and split-K. For each projection (W is [N, K] as in nn.Linear, y = x @ W.T) and each M this times:
- `F.linear(x, W)`: cuBLAS's default choice ("TN");
- `x @ Wt` with Wt = W.t().contiguous() ("NN"): another cuBLAS kernel;
- `F.linear` under `torch.backends.cuda.preferred_blas_library("cublaslt")`;
- a Triton tiled GEMM (bf16 in, fp32 accumulate, bf16 out; tiles loaded through pointers or through TMA
  tensor descriptors) over 16 tile/warp/stage configurations, three of them split-K (fp32 atomics into a
  zeroed buffer, then a cast; run only where the output has fewer tiles than there are SMs), only for
  the M in --triton-m, since compiles cost 1-3 s each.
Each candidate's result is checked against `F.linear` (max |error| / max |reference| < 1e-2; a config over
that is WRONG and never the best). Timing as in attention_sweep.py: one warm-up, then `reps` calls queued
back to back, each between CUDA events, one synchronize, the median; a spin kernel queued first keeps the
GPU busy while the host queues, so that the ~60 us of Python in a Triton launch (more than o_proj's
~19 us at M=256) is not what gets timed, as it was for cuBLAS's smallest shapes too. Weights are rotated
over 2-4 copies per shape so that a small weight does not stay in the 60 MB L2 between calls. The summary
prices a whole decode step's matmuls: 32 layers of qkv/o_proj/gate_up/down plus lm_head once, per M.

    python benchmarks/gemm_sweep.py --out $OUT/gemm_sweep.json [--m 128,256,512,8192 --triton-m 256,512]

Smoke test (tiny shapes, Triton on the CPU interpreter, wall-clock timing; also chosen with no CUDA device;
it exits non-zero if any result is WRONG or any config fails other than for lack of shared memory):

    TRITON_INTERPRET=1 python benchmarks/gemm_sweep.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # without a GPU Triton can only interpret; it must know before its own @jit functions load
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from attention_sweep import time_ms as device_time_ms  # noqa: E402  (benchmarks/ is on the path)
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRET = triton.knobs.runtime.interpret

RESULTS = Path("benchmarks/results/gemm_sweep.json")
BF16_TFLOPS = 782  # large bf16 GEMMs measured on this H200
MAX_REL_ERR = 1e-2
LAYERS = 32
# name: (N, K, times per decode step)
SHAPES = {
    "qkv": (6144, 4096, LAYERS),
    "o_proj": (4096, 4096, LAYERS),
    "gate_up": (28672, 4096, LAYERS),
    "down": (4096, 14336, LAYERS),
    "lm_head": (128256, 4096, 1),
}
# Ragged sizes exercise the kernel's masks and a split count above 1 on the interpreter.
SMOKE_SHAPES = {"tiny": (64, 64, 1), "ragged": (96, 320, 1)}
SMOKE_MS = [16, 20]


@dataclass(frozen=True)
class GemmConfig:
    kernel: str  # "ptr": pointer loads (cp.async); "tma": tensor-descriptor loads; "splitk": tma + atomics
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def label(self, split: int) -> str:
        kernel = f"tma splitK={split}" if self.kernel == "splitk" else self.kernel
        tile = f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"
        return f"triton {kernel} {tile} g{self.group_m}"


# Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes of the 227 KB an H200 SM offers
# (128x256x64 at 5 stages needs 240 KB: OutOfResources). In this sweep's first runs on the H200, TMA
# loads beat pointer loads by 10-25% at M=256-512 and 8 warps lost to 4 on every tile but 128x256, so
# most configs are 4-warp TMA ones; three pointer-load configs stay as the reference for that.
CONFIGS = [
    GemmConfig("ptr", 64, 128, 128, 4, 4),
    GemmConfig("ptr", 64, 256, 64, 4, 5),
    GemmConfig("ptr", 128, 128, 64, 4, 4),
    GemmConfig("tma", 64, 128, 64, 4, 4),
    GemmConfig("tma", 64, 128, 128, 4, 3),
    GemmConfig("tma", 64, 128, 128, 4, 4),
    GemmConfig("tma", 64, 256, 64, 4, 4),
    GemmConfig("tma", 64, 256, 64, 4, 5),
    GemmConfig("tma", 128, 128, 64, 4, 4),
    GemmConfig("tma", 128, 128, 64, 4, 5),
    GemmConfig("tma", 128, 128, 64, 4, 5, group_m=1),  # row-major tile order: W tiles' readers run apart
    GemmConfig("tma", 128, 128, 128, 8, 3),
    GemmConfig("tma", 128, 256, 64, 8, 4),
    GemmConfig("splitk", 64, 256, 64, 4, 5),
    GemmConfig("splitk", 128, 128, 64, 4, 5),
    GemmConfig("splitk", 128, 256, 64, 8, 4),
]


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (row, column). GROUP_M row tiles run next to each other on each column
    tile of W, so each W tile is read from HBM about once per group rather than once per row tile."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(tl.cdiv(M, BLOCK_M) - first_pid_m, GROUP_M)
    return first_pid_m + (pid % num_pid_in_group) % group_size_m, (pid % num_pid_in_group) // group_size_m


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter only) multiplies in fp32: the interpreter's bf16 `tl.dot`
    multiplies the raw bits."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _store_tile(
    y_ptr,
    acc,
    pid_m,
    pid_n,
    M,
    N,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """The tile into y, masked at the edges: added to it (fp32 atomics) with ATOMIC, else cast and stored."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_ptr_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y[M, N] = x[M, K] @ w[N, K].T, one output tile per program, tiles loaded through pointers."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Rows and columns past the edge wrap around (loads need no mask there); the store masks them.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # W's tile is loaded as [BLOCK_K, BLOCK_N] (K-major); wgmma reads that transposed layout directly.
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot(a, b, acc, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    _store_tile(y_ptr, acc, pid_m, pid_n, M, N, stride_ym, stride_yn, BLOCK_M, BLOCK_N, False)


@triton.jit(do_not_specialize=["split_k"])
def _gemm_tma_kernel(
    x_desc,
    w_desc,
    y_ptr,
    M,
    N,
    K,
    split_k,
    stride_ym,
    stride_yn,
    GROUP_M: tl.constexpr,
    ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y = x @ w.T for one output tile and one of split_k slices of K (axis 1), tiles fetched by the copy
    engine (TMA) through tensor descriptors, which zero-fill past the edges. ATOMIC: y is a zeroed fp32
    buffer that the slices add into."""
    BLOCK_M: tl.constexpr = x_desc.block_shape[0]
    BLOCK_K: tl.constexpr = x_desc.block_shape[1]
    BLOCK_N: tl.constexpr = w_desc.block_shape[0]
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, split_k)
    k_first = tl.program_id(1) * tiles_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_first, tl.minimum(k_first + tiles_per_split, k_tiles)):
        a = x_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
        b = w_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
        acc = _dot(a, b.T, acc, UPCAST)
    _store_tile(y_ptr, acc, pid_m, pid_n, M, N, stride_ym, stride_yn, BLOCK_M, BLOCK_N, ATOMIC)


def num_sms() -> int:
    """Streaming multiprocessors to fill; 132 (an H200) on the interpreter."""
    return torch.cuda.get_device_properties(0).multi_processor_count if HAS_CUDA else 132


def split_count(config: GemmConfig, m: int, n: int, k: int, sms: int, max_split: int = 8) -> int:
    """K slices for a split-K config: where the output has fewer tiles than there are SMs, enough slices to
    fill them once (o_proj at M=256: 64 tiles of 128x128, 2 slices); otherwise 1, the plain kernel."""
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    if config.kernel != "splitk" or tiles >= sms:
        return 1
    return max(1, min(sms // tiles, triton.cdiv(k, config.block_k), max_split))


def triton_linear(x: torch.Tensor, w: torch.Tensor, config: GemmConfig, split: int) -> torch.Tensor:
    """x @ w.T in bf16. With split > 1 the slices add into a zeroed fp32 buffer, cast at the end; both
    extra kernels are part of what is timed."""
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split)
    meta = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    upcast = INTERPRET and x.dtype == torch.bfloat16
    if config.kernel == "ptr":
        y = x.new_empty(m, n)
        tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
        strides = (*x.stride(), *w.stride(), *y.stride())
        _gemm_ptr_kernel[grid](
            x, w, y, m, n, k, *strides, **tiles, GROUP_M=config.group_m, UPCAST=upcast, **meta
        )
        return y
    atomic = split > 1
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else x.new_empty(m, n)
    x_desc = TensorDescriptor.from_tensor(x, [config.block_m, config.block_k])
    w_desc = TensorDescriptor.from_tensor(w, [config.block_n, config.block_k])
    _gemm_tma_kernel[grid](
        x_desc, w_desc, y, m, n, k, split, *y.stride(), config.group_m, atomic, upcast, **meta
    )
    return y.to(x.dtype) if atomic else y


def time_ms(fn: Callable[[], object], reps: int) -> float:
    """`attention_sweep.time_ms` (device time, calls queued behind a spin kernel); without CUDA, the
    median wall time of one call."""
    if HAS_CUDA:
        return device_time_ms(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def blas_library(name: str) -> Iterator[None]:
    """torch's preferred BLAS library set to `name` inside the block, the previous one restored after."""
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def measure(call: Callable[[int], torch.Tensor], copies: int, ref: torch.Tensor, reps: int) -> dict:
    """Check call(0) (weight copy 0) against ref, then time calls rotating over the weight copies."""
    err = rel_err(call(0), ref)
    index = itertools.cycle(range(copies))
    ms = time_ms(lambda: call(next(index)), reps)
    return dict(ms=ms, rel_err=err, status="ok" if err < MAX_REL_ERR else "WRONG")


@dataclass
class Candidate:
    label: str
    call: Callable[[int], torch.Tensor]  # weight copy index -> x @ W.T
    context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    config: GemmConfig | None = None  # the Triton config, None for a cuBLAS candidate


def sweep_shape(
    name: str,
    n: int,
    k: int,
    m_values: list[int],
    triton_m: set[int],
    reps: int,
    failed: dict[GemmConfig, str],
) -> list[dict]:
    """All candidates for one weight shape at each M. `failed` carries the configs that did not build
    (a shared-memory limit does not depend on the shape), so they are not compiled again."""
    copies = 4 if n * k * 2 < 512e6 else 2  # lm_head: 1 GB a copy, 2 are plenty against a 60 MB L2
    weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
    weights_t = [w.t().contiguous() for w in weights]
    sms = num_sms()
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        ref = F.linear(x, weights[0])
        candidates = [
            Candidate("cublas F.linear (TN, default)", lambda i, x=x: F.linear(x, weights[i])),
            Candidate("cublas x @ Wt (NN)", lambda i, x=x: x @ weights_t[i]),
            Candidate(
                "cublasLt F.linear (TN)", lambda i, x=x: F.linear(x, weights[i]), blas_library("cublaslt")
            ),
        ]
        if m in triton_m:
            for config in CONFIGS:
                split = split_count(config, m, n, k, sms)
                if config.kernel == "splitk" and split == 1:
                    continue  # fills the SMs unsplit: the plain TMA configs cover it
                call = lambda i, x=x, c=config, s=split: triton_linear(x, weights[i], c, s)
                candidates.append(Candidate(config.label(split), call, config=config))
        for c in candidates:
            row = dict(shape=name, m=m, n=n, k=k, candidate=c.label, ms=None, tflops=None, rel_err=None)
            if c.config in failed:
                row["status"] = failed[c.config]
            else:
                try:
                    with c.context:
                        row.update(measure(c.call, copies, ref, reps))
                except triton.runtime.errors.OutOfResources as error:
                    row["status"] = failed[c.config] = f"OutOfResources ({error.name})"
                except Exception as error:  # cuBLASLt not selectable here, or a config that does not build
                    kind = "unsupported" if c.config is None else "error"
                    row["status"] = f"{kind}: {type(error).__name__}: {str(error)[:100]}"
                    if c.config is not None:
                        failed[c.config] = row["status"]
            if row["ms"] is not None:
                row["tflops"] = 2 * m * n * k / row["ms"] / 1e9
            rows.append(row)
            print(f"{name} M={m} {c.label}: {row['status']}", flush=True)
    return rows


def mark_best(rows: list[dict]) -> None:
    for key, group in itertools.groupby(rows, key=lambda r: (r["shape"], r["m"])):
        group = list(group)
        for row in group:
            row["best"] = False
        ok = [row for row in group if row["status"] == "ok"]
        if ok:
            min(ok, key=lambda r: r["ms"])["best"] = True
        else:
            print(f"{key}: no candidate ran correctly")


def summarise(rows: list[dict], shapes: dict[str, tuple[int, int, int]]) -> dict[int, dict]:
    """Per M: one decode step's matmuls (each shape times its count) with default cuBLAS vs the best of all
    candidates and the best cuBLAS candidate."""
    summary: dict[int, dict] = {}
    for m in sorted({row["m"] for row in rows}):
        totals = dict(default_ms=0.0, best_cublas_ms=0.0, best_ms=0.0)
        for name, (_, _, count) in shapes.items():
            ok = [r for r in rows if r["shape"] == name and r["m"] == m and r["status"] == "ok"]
            default = [r["ms"] for r in ok if r["candidate"].startswith("cublas F.linear")]
            cublas = [r["ms"] for r in ok if r["candidate"].startswith("cublas")]
            totals["default_ms"] += count * (default[0] if default else math.nan)
            totals["best_cublas_ms"] += count * min(cublas, default=math.nan)
            totals["best_ms"] += count * min((r["ms"] for r in ok), default=math.nan)
        totals["speedup"] = totals["default_ms"] / totals["best_ms"]
        summary[m] = totals
    return summary


def print_table(rows: list[dict], summary: dict[int, dict], shapes: dict[str, tuple[int, int, int]]) -> None:
    print(
        f"\n{'shape':<9}{'M':>6}  {'candidate':<44}{'ms':>9}{'TFLOP/s':>9}{'% peak':>8}{'rel err':>9}  status"
    )
    for row in rows:
        flag = " *" if row["best"] else "  "
        if row["ms"] is None:
            numbers = f"{'-':>9}{'-':>9}{'-':>8}{'-':>9}"
        else:
            share = row["tflops"] / BF16_TFLOPS
            numbers = f"{row['ms']:>9.4f}{row['tflops']:>9.1f}{share:>8.1%}{row['rel_err']:>9.1e}"
        print(f"{row['shape']:<9}{row['m']:>6}{flag}{row['candidate']:<44}{numbers}  {row['status']}")
    print(f"* = fastest correct candidate for its (shape, M); % peak of {BF16_TFLOPS} TFLOP/s")
    counts = " + ".join(f"{count} x {name}" for name, (_, _, count) in shapes.items())
    print(f"\nOne decode step's matmuls ({counts}), ms:")
    print(f"{'M':>6}{'default cuBLAS':>16}{'best cuBLAS':>13}{'best of all':>13}{'speedup':>9}")
    for m, t in summary.items():
        values = (t["default_ms"], t["best_cublas_ms"], t["best_ms"], t["speedup"])
        print(f"{m:>6}{values[0]:>16.3f}{values[1]:>13.3f}{values[2]:>13.3f}{values[3]:>8.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--m", default="128,256,512,8192", help="rows of x, comma separated")
    parser.add_argument("--triton-m", default="256,512", help="the M values at which Triton configs run")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", help="JSON results (default benchmarks/results/gemm_sweep.json; smoke: tmp)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; Triton interpreted without a GPU")
    args = parser.parse_args()
    smoke = args.smoke or not HAS_CUDA
    if smoke and HAS_CUDA:
        print("--smoke on a GPU: tiny shapes, Triton compiled (TRITON_INTERPRET=1 for the interpreter)")
    torch.manual_seed(0)
    shapes = SMOKE_SHAPES if smoke else SHAPES
    m_values = SMOKE_MS if smoke else [int(v) for v in args.m.split(",")]
    triton_m = set(m_values) if smoke else {int(v) for v in args.triton_m.split(",")}
    reps = 2 if smoke else args.reps  # the smoke run checks results; its timings mean nothing
    start = time.perf_counter()
    failed: dict[GemmConfig, str] = {}
    rows = []
    for name, (n, k, _) in shapes.items():
        rows += sweep_shape(name, n, k, m_values, triton_m, reps, failed)
    mark_best(rows)
    summary = summarise(rows, shapes)
    results = dict(
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu (Triton interpreter)",
        torch=torch.__version__,
        triton=triton.__version__,
        peak_tflops=BF16_TFLOPS,
        reps=reps,
        smoke=smoke,
        wall_s=time.perf_counter() - start,
        rows=rows,
        summary=summary,
    )
    # A smoke run's numbers are no results: by default they go to the temporary directory.
    default_out = Path(tempfile.gettempdir(), "gemm_sweep_smoke.json") if smoke else RESULTS
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(rows, summary, shapes)
    wrong = [r for r in rows if r["status"] == "WRONG"]
    print(f"\n{len(rows)} rows, {len(wrong)} WRONG, {results['wall_s']:.0f} s; written to {out}")
    broken = [r for r in rows if r["status"] == "WRONG" or r["status"].startswith("error")]
    if smoke and broken:  # the smoke test's point: every Triton variant that fits runs and is right
        raise SystemExit(f"smoke test failed: {len(broken)} rows WRONG or in error")


if __name__ == "__main__":
    main()
