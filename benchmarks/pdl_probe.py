"""Does programmatic dependent launch (PDL) work from Triton here, inside CUDA graphs, and what does it save?

A chain of dependent GEMV-sized kernels (y_{i+1} = f(W_i, y_i)), captured in one CUDA graph, with and
without PDL. With PDL each kernel loads its first weight tile before `gdc_wait` (the weights do not
depend on the previous kernel) and lets the next kernel launch as soon as it starts.

    python benchmarks/pdl_probe.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, K, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    w = tl.load(w_ptrs).to(tl.float32)  # independent of the previous kernel
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    acc = w * tl.load(x_ptr + offs_k).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_ptrs + k0).to(tl.float32)
        acc += w * tl.load(x_ptr + k0 + offs_k).to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    tl.store(y_ptr + offs_n, (y / 64.0).to(y_ptr.dtype.element_ty))


def chain(xs, weights, pdl: bool) -> None:
    for i, w in enumerate(weights):
        n, k = w.shape
        kwargs = dict(launch_pdl=True) if pdl else {}
        _gemv_kernel[(n // 4,)](
            xs[i], w, xs[i + 1], k, PDL=pdl, BLOCK_N=4, BLOCK_K=2048, num_warps=4, **kwargs
        )


def main() -> None:
    torch.manual_seed(0)
    print("triton", triton.__version__, "torch", torch.__version__)
    for n_mb in (8, 34, 117):
        n = k = int((n_mb * 1e6 / 2) ** 0.5) // 2048 * 2048
        layers = 64
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        xs = [torch.randn(k, device="cuda", dtype=torch.bfloat16) for _ in range(layers + 1)]
        results = {}
        for pdl in (False, True, False, True):
            chain(xs, weights, pdl)
            ref = xs[-1].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                chain(xs, weights, pdl)
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(ref, xs[-1])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            end.synchronize()
            us = start.elapsed_time(end) * 1e3 / 10 / layers
            results.setdefault(pdl, []).append(us)
            print(
                f"{n}x{k} ({2 * n * k / 1e6:.0f} MB) pdl={pdl}: {us:.2f} us/kernel, "
                f"{2 * n * k / us / 1e6:.2f} TB/s, result equal to eager: {same}"
            )
        print(f"  PDL saves {min(results[False]) - min(results[True]):.2f} us per kernel")


if __name__ == "__main__":
    main()
