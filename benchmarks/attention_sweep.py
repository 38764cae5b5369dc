"""Decode attention kernel configurations on the GPU, bf16 vs FP8 KV cache: time and TB/s achieved.

Llama-3-8B attention shapes (8 KV heads, group 4, head_dim 128), one layer's cache, batch x context
as in the 1000 x 1000 workload's middle. Each configuration runs 20 times after a warm-up; the
median is reported against the copy rate (4.25 TB/s).

    python benchmarks/attention_sweep.py [--batch 256 --context 1500]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from functools import partial

import torch

from tensorjet.kernels.decode_attention import decode_attention


def time_ms(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1500)
    args = parser.parse_args()
    hk, group, d, page = 8, 4, 128, 16
    blocks_per_seq = -(-args.context // page)
    num_blocks = args.batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(args.batch, blocks_per_seq)
    lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    q = torch.randn(args.batch, hk * group, d, device="cuda", dtype=torch.bfloat16)
    rows = []
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        k = torch.randn(num_blocks, page, hk, d, device="cuda").to(kv_dtype)
        v = torch.randn(num_blocks, page, hk, d, device="cuda").to(kv_dtype)
        nbytes = 2 * args.batch * args.context * hk * d * k.element_size()
        configs = [(None, 4, 2)] + list(itertools.product((64, 128), (4,), (2, 3, 4))) + [(128, 8, 2)]
        for block_n, warps, stages in configs:
            try:
                config = dict(num_splits=1, block_n=block_n, num_warps=warps, num_stages=stages)
                ms = time_ms(partial(decode_attention, q, k, v, tables, lens, d**-0.5, **config))
            except Exception as error:  # e.g. out of shared memory
                print(f"{kv_dtype} {block_n} {warps} {stages}: {type(error).__name__}")
                continue
            name = str(kv_dtype).removeprefix("torch.")
            rows.append((name, block_n or "default", warps, stages, ms, nbytes / ms / 1e9))
        # Batch 1, short context, the default split heuristic: the latency case.
        k1, v1 = k[:blocks_per_seq], v[:blocks_per_seq]
        table1 = torch.arange(blocks_per_seq, device="cuda", dtype=torch.int32)[None]
        lens1 = torch.full((1,), 300, dtype=torch.int32, device="cuda")
        ms = time_ms(partial(decode_attention, q[:1], k1, v1, table1, lens1, d**-0.5, max_context_len=300))
        rows.append((name, "b1 ctx300", 4, 2, ms, 2 * 300 * hk * d * k.element_size() / ms / 1e9))
    print(f"\n{'kv dtype':<16}{'BLOCK_N':>8}{'warps':>6}{'stages':>7}{'ms':>9}{'TB/s':>7}")
    for name, block_n, warps, stages, ms, tbps in rows:
        print(f"{name:<16}{block_n:>8}{warps:>6}{stages:>7}{ms:>9.3f}{tbps:>7.2f}")


if __name__ == "__main__":
    main()
