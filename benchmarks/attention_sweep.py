"""Paged attention kernel configurations on the GPU, bf16 vs FP8 KV cache: time against the limits.

Llama-3-8B attention shapes (8 KV heads, group 4, head_dim 128, pages of 16), one layer.
- decode: batch x context as in the 1000 x 1000 workload's middle; TB/s against the copy rate (4.25);
- extend: 8 prompts of 1,024 tokens (a prefill step) and 8 chunks of 512 on 1,536 cached tokens;
  TFLOP/s (causal work only) against the bf16 peak (782).
Each configuration runs 20 times after a warm-up; the median is reported.

Triton 3.6 double-buffers a loop whose K/V addresses come from a block-table load only from
num_stages=5: at 3 or 4 the next tile's copy is issued after this tile's compute and waited for at
once (one tile in flight per program). The sweep times both sides of that line.

    python benchmarks/attention_sweep.py [--batch 256 --context 1500 --kernels decode,extend]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from functools import partial

import torch

from tensorjet.kernels.decode_attention import decode_attention
from tensorjet.kernels.extend_attention import extend_attention

COPY_TBPS = 4.25
BF16_TFLOPS = 782


def time_ms(fn, reps: int = 20) -> float:
    """Median device time of fn's kernels. The calls are queued back to back with one sync at the end,
    so the host's launch overhead (the Python wrapper: 50-100 us) overlaps the previous call's kernels
    instead of being timed with them, as it was when each call was synchronised (before 2026-11-29)."""
    fn()
    torch.cuda.synchronize()
    timer = partial(torch.cuda.Event, enable_timing=True)
    events = [(timer(), timer()) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def decode_rows(args) -> list[tuple]:
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
        name = "decode " + str(kv_dtype).removeprefix("torch.")
        reference = decode_attention(q, k, v, tables, lens, d**-0.5, num_splits=1)
        configs = [(None, None, None), (64, 4, 3), (64, 4, 5), (64, 4, 6), (128, 4, 3), (128, 4, 5)]
        configs += [(128, 4, 6), (128, 8, 3), (128, 8, 5), (256, 4, 5), (256, 8, 5), (64, 2, 5), (128, 2, 5)]
        for block_n, warps, stages in configs:
            config = dict(num_splits=1, block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                out = decode_attention(q, k, v, tables, lens, d**-0.5, **config)
                ms = time_ms(partial(decode_attention, q, k, v, tables, lens, d**-0.5, **config))
            except Exception as error:  # e.g. out of shared memory
                print(f"{name} {block_n}/{warps}/{stages}: {type(error).__name__}")
                continue
            err = (out.float() - reference.float()).abs().max().item()
            label = "default" if block_n is None else f"{block_n}/{warps}/{stages}"
            tbps = nbytes / ms / 1e9
            rows.append((name, label, ms, f"{tbps:.2f} TB/s", f"{tbps / COPY_TBPS:.0%}", err))
        # Batch 1, short context, the default split heuristic: the latency case.
        k1, v1 = k[:blocks_per_seq], v[:blocks_per_seq]
        table1 = torch.arange(blocks_per_seq, device="cuda", dtype=torch.int32)[None]
        ctx1 = min(300, args.context)
        lens1 = torch.full((1,), ctx1, dtype=torch.int32, device="cuda")
        ms = time_ms(partial(decode_attention, q[:1], k1, v1, table1, lens1, d**-0.5, max_context_len=ctx1))
        tbps = 2 * ctx1 * hk * d * k.element_size() / ms / 1e9
        rows.append((name, "b1 ctx300 default", ms, f"{tbps:.2f} TB/s", f"{tbps / COPY_TBPS:.0%}", 0.0))
    return rows


def extend_rows() -> list[tuple]:
    hk, group, d, page = 8, 4, 128, 16
    rows = []
    for kv_dtype, (num_seqs, q_len, prefix) in itertools.product(
        (torch.bfloat16, torch.float8_e4m3fn), ((8, 1024, 0), (8, 512, 1536))
    ):
        ctx = prefix + q_len
        blocks_per_seq = -(-ctx // page)
        num_blocks = num_seqs * blocks_per_seq
        tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(num_seqs, -1)
        k = torch.randn(num_blocks, page, hk, d, device="cuda").to(kv_dtype)
        v = torch.randn_like(k, dtype=torch.float32).to(kv_dtype)
        q = torch.randn(num_seqs * q_len, hk * group, d, device="cuda", dtype=torch.bfloat16)
        starts = torch.arange(0, num_seqs * q_len, q_len, device="cuda", dtype=torch.int32)
        q_lens = torch.full((num_seqs,), q_len, device="cuda", dtype=torch.int32)
        ctx_lens = torch.full((num_seqs,), ctx, device="cuda", dtype=torch.int32)
        # causal work: every query attends to the prefix and to the new tokens up to itself
        flops = 4 * num_seqs * hk * group * d * (q_len * prefix + q_len * (q_len + 1) / 2)
        lengths = dict(max_query_len=q_len)
        call = partial(extend_attention, q, k, v, tables, starts, q_lens, ctx_lens, d**-0.5, **lengths)
        reference = call()
        name = f"extend {str(kv_dtype).removeprefix('torch.')} {num_seqs}x{q_len}+{prefix}"
        configs = [(None,) * 4, (128, 64, 8, 3), (128, 64, 8, 5), (128, 128, 8, 5), (128, 64, 4, 5)]
        configs += [(64, 64, 4, 3), (64, 64, 4, 5), (64, 128, 4, 5), (128, 32, 8, 5)]
        for block_m, block_n, warps, stages in configs:
            config = dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                out = call(**config)
                ms = time_ms(partial(call, **config))
            except Exception as error:
                print(f"{name} {block_m}/{block_n}/{warps}/{stages}: {type(error).__name__}")
                continue
            err = (out.float() - reference.float()).abs().max().item()
            label = "default" if block_m is None else f"{block_m}/{block_n}/{warps}/{stages}"
            tflops = flops / ms / 1e9
            rows.append((name, label, ms, f"{tflops:.0f} TFLOP/s", f"{tflops / BF16_TFLOPS:.0%}", err))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--kernels", default="decode,extend")
    args = parser.parse_args()
    torch.manual_seed(0)
    kernels = args.kernels.split(",")
    rows = (decode_rows(args) if "decode" in kernels else []) + (extend_rows() if "extend" in kernels else [])
    print(f"\n{'kernel':<34}{'config':>20}{'ms':>9}{'rate':>16}{'of limit':>9}{'max err':>9}")
    for name, label, ms, rate, share, err in rows:
        print(f"{name:<34}{label:>20}{ms:>9.3f}{rate:>16}{share:>9}{err:>9.1e}")
    print("decode config = BLOCK_N/warps/stages; extend config = BLOCK_M/BLOCK_N/warps/stages")


if __name__ == "__main__":
    main()
