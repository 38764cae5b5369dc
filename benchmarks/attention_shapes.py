"""The attention kernels across shapes on a GPU (`attention_sweep.py` sweeps launch configurations).

Decode: achieved KV-read bandwidth for several batch/context shapes and split counts (the heuristic's
choice is marked with *). Extend: TFLOP/s of a fresh prompt and of a chunk behind a cached prefix,
against PyTorch SDPA on contiguous K/V as a yardstick.

    python benchmarks/attention_shapes.py [--only decode|extend] [--graph] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from tensorjet.kernels.decode_attention import choose_num_splits, decode_attention
from tensorjet.kernels.extend_attention import extend_attention


def _paged(context_lens, block_size, num_kv_heads, head_dim, dtype, device):
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.full((len(context_lens), max(need)), -1, dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n]
        used += n
    return k_cache, v_cache, tables


def _time_ms(fn, graph: bool) -> float:
    """do_bench of fn, or of the replay of a CUDA graph holding it (no Python launch overhead)."""
    if not graph:
        return do_bench(fn, warmup=10, rep=50)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=50)


def bench_decode(dtype, num_kv_heads, group, head_dim, block_size, device, graph=False) -> None:
    print(f"decode {dtype} Hk={num_kv_heads} group={group} D={head_dim} block={block_size} graph={graph}")
    for batch, ctx in [(1, 4096), (1, 32768), (8, 8192), (32, 4096), (64, 2048), (256, 1024), (128, 4096)]:
        k_cache, v_cache, tables = _paged([ctx] * batch, block_size, num_kv_heads, head_dim, dtype, device)
        q = torch.randn(batch, num_kv_heads * group, head_dim, dtype=dtype, device=device)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * k_cache.element_size()
        best = choose_num_splits(batch, num_kv_heads, ctx, device)
        cells = []
        for s in sorted({1, 2, 4, 8, 16, 32, best}):
            fn = partial(decode_attention, q, k_cache, v_cache, tables, lens, 0.1, out, num_splits=s)
            ms = _time_ms(fn, graph)
            cells.append(f"{s}{'*' if s == best else ''}:{kv_bytes / ms / 1e6:5.0f}")
        print(f"  B={batch:4d} ctx={ctx:6d}  GB/s by splits  " + "  ".join(cells))


def bench_extend(dtype, num_kv_heads, group, head_dim, block_size, device) -> None:
    print(f"extend {dtype} Hk={num_kv_heads} group={group} D={head_dim} block={block_size}")
    hq = num_kv_heads * group
    for n_seqs, q_len, prefix in [(1, 4096, 0), (4, 1024, 0), (1, 512, 8192), (16, 256, 1024)]:
        ctx = q_len + prefix
        k_cache, v_cache, tables = _paged([ctx] * n_seqs, block_size, num_kv_heads, head_dim, dtype, device)
        q = torch.randn(n_seqs * q_len, hq, head_dim, dtype=dtype, device=device)
        qsl = torch.arange(n_seqs + 1, dtype=torch.int32, device=device) * q_len
        qlens = torch.full((n_seqs,), q_len, dtype=torch.int32, device=device)
        clens = torch.full((n_seqs,), ctx, dtype=torch.int32, device=device)
        out = torch.empty_like(q)
        fn = partial(
            extend_attention, q, k_cache, v_cache, tables, qsl, qlens, clens, 0.1, out, max_query_len=q_len
        )
        ms = do_bench(fn, warmup=10, rep=50)
        flops = 4 * n_seqs * hq * head_dim * (q_len * prefix + q_len * (q_len + 1) / 2)
        # SDPA yardstick on contiguous K/V (no paging) with the same causal-with-offset mask.
        qs = torch.randn(n_seqs, hq, q_len, head_dim, dtype=dtype, device=device)
        ks = torch.randn(n_seqs, hq, ctx, head_dim, dtype=dtype, device=device)
        if prefix == 0:
            sdpa = partial(F.scaled_dot_product_attention, qs, ks, ks, is_causal=True)
        else:
            mask = torch.ones(q_len, ctx, dtype=torch.bool, device=device).tril(prefix)
            sdpa = partial(F.scaled_dot_product_attention, qs, ks, ks, attn_mask=mask)
        ms_ref = do_bench(sdpa, warmup=10, rep=50)
        print(
            f"  seqs={n_seqs:3d} q_len={q_len:5d} prefix={prefix:5d}  triton {flops / ms / 1e9:6.1f} TFLOP/s"
            f" ({ms:.3f} ms)  sdpa {flops / ms_ref / 1e9:6.1f} TFLOP/s ({ms_ref:.3f} ms)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--graph", action="store_true", help="time decode as CUDA-graph replays")
    parser.add_argument("--only", choices=["decode", "extend"], default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = (dtype, args.kv_heads, args.group, args.head_dim, args.block_size, torch.device("cuda"))
    if args.only != "extend":
        bench_decode(*shape, graph=args.graph)
    if args.only != "decode":
        bench_extend(*shape)


if __name__ == "__main__":
    main()
