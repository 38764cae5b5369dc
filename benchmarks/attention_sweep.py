"""Paged attention kernel configurations on the GPU, bf16 vs FP8 KV cache: time against the limits.

Llama-3-8B attention shapes (8 KV heads, group 4, head_dim 128, pages of 16), one layer.
- decode: batch x context as in the 1000 x 1000 workload's middle; TB/s against the copy rate (4.25);
- extend: 8 prompts of 1,024 tokens (a prefill step) and 8 chunks of 512 on 1,536 cached tokens;
  TFLOP/s (causal work only) against the bf16 peak (782).
Each configuration runs 20 times after a warm-up; the median is reported.

Triton 3.6 double-buffers a loop whose K/V addresses come from a block-table load only from
num_stages=5: at 3 or 4 the next tile's copy is issued after this tile's compute and waited for at
once (one tile in flight per program). The sweep times both sides of that line.

    python benchmarks/attention_sweep.py [--batch 256 --context 1500 --kernels decode,ragged,extend]
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
HK, GROUP, D, PAGE = 8, 4, 128, 16  # Llama-3-8B attention: KV heads, queries per KV head, head_dim; page


def paged_kv(num_blocks: int, kv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A random paged K and V cache of `num_blocks` pages."""
    k = torch.randn(num_blocks, PAGE, HK, D, device="cuda").to(kv_dtype)
    return k, torch.randn_like(k, dtype=torch.float32).to(kv_dtype)


def ragged_decode_lens(batch: int) -> torch.Tensor:
    """Contexts of HF's workload's decode steps a hundred tokens in: 200-1,100 (host, int32)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(200, 1101, (batch,), generator=gen, dtype=torch.int32)


def ragged_prefill_lens(seed: int) -> list[int]:
    """HF's workload's prefill step: prompts of 100-1,024 tokens up to 8,192 tokens in all."""
    gen = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    while sum(lens) < 8192 - 1024:
        lens.append(int(torch.randint(100, 1025, (1,), generator=gen)))
    return lens


def extend_call(q_lens_host: list[int], prefix: int, kv_dtype: torch.dtype) -> partial:
    """extend_attention over prompts of `q_lens_host` new tokens, each after `prefix` cached ones, on a
    random paged cache; keyword arguments (tile sizes) pass through."""
    num_seqs, q_len = len(q_lens_host), max(q_lens_host)
    blocks_per_seq = -(-(prefix + q_len) // PAGE)
    tables = torch.randperm(num_seqs * blocks_per_seq, device="cuda", dtype=torch.int32).view(num_seqs, -1)
    k, v = paged_kv(num_seqs * blocks_per_seq, kv_dtype)
    q = torch.randn(sum(q_lens_host), HK * GROUP, D, device="cuda", dtype=torch.bfloat16)
    starts = torch.tensor([0, *itertools.accumulate(q_lens_host)][:-1], device="cuda", dtype=torch.int32)
    q_lens = torch.tensor(q_lens_host, device="cuda", dtype=torch.int32)
    return partial(
        extend_attention, q, k, v, tables, starts, q_lens, q_lens + prefix, D**-0.5, max_query_len=q_len
    )


def time_ms(fn, reps: int = 20) -> float:
    """Median device time of fn's kernels. The calls are queued back to back with one sync at the end,
    behind a spin kernel that holds the GPU while the host queues them: a Triton launch costs ~60 us of
    Python, more than a small kernel runs, and would otherwise be what is timed (before 2026-11-29
    every call was synchronised, which timed the wrapper's launch overhead with the kernel)."""
    fn()
    torch.cuda.synchronize()
    timer = partial(torch.cuda.Event, enable_timing=True)
    events = [(timer(), timer()) for _ in range(reps)]
    torch.cuda._sleep(500_000 * reps)  # ~0.25 ms a call at 1.98 GHz
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def decode_rows(args) -> list[tuple]:
    blocks_per_seq = -(-args.context // PAGE)
    num_blocks = args.batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(args.batch, blocks_per_seq)
    lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    q = torch.randn(args.batch, HK * GROUP, D, device="cuda", dtype=torch.bfloat16)
    rows = []
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        k, v = paged_kv(num_blocks, kv_dtype)
        nbytes = 2 * args.batch * args.context * HK * D * k.element_size()
        name = "decode " + str(kv_dtype).removeprefix("torch.")
        reference = decode_attention(q, k, v, tables, lens, D**-0.5, num_splits=1)
        configs = [(None, None, None), (64, 4, 3), (64, 4, 5), (64, 4, 6), (128, 4, 3), (128, 4, 5)]
        configs += [(128, 4, 6), (128, 8, 3), (128, 8, 5), (256, 4, 5), (256, 8, 5), (64, 2, 5), (128, 2, 5)]
        configs += [(32, 4, 3), (64, 4, 2), (64, 4, 4), (128, 4, 4), (128, 8, 4)]
        for block_n, warps, stages in configs:
            config = dict(num_splits=1, block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                out = decode_attention(q, k, v, tables, lens, D**-0.5, **config)
                ms = time_ms(partial(decode_attention, q, k, v, tables, lens, D**-0.5, **config))
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
        ms = time_ms(partial(decode_attention, q[:1], k1, v1, table1, lens1, D**-0.5, max_context_len=ctx1))
        tbps = 2 * ctx1 * HK * D * k.element_size() / ms / 1e9
        rows.append((name, "b1 ctx300 default", ms, f"{tbps:.2f} TB/s", f"{tbps / COPY_TBPS:.0%}", 0.0))
    return rows


def ragged_decode_rows(args) -> list[tuple]:
    """Decode over ragged contexts (HF's workload a hundred tokens in: 200-1,100) across tile / warp /
    stage configurations; the default also longest first and with 2 KV splits (does the tail of short
    and long programs cost anything?)."""
    lens_host = ragged_decode_lens(args.batch)
    blocks_per_seq = -(-1100 // PAGE)
    num_blocks = args.batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(args.batch, blocks_per_seq)
    q = torch.randn(args.batch, HK * GROUP, D, device="cuda", dtype=torch.bfloat16)
    longest_first = torch.argsort(lens_host, descending=True).cuda()
    rows = []
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        k, v = paged_kv(num_blocks, kv_dtype)
        nbytes = 2 * int(lens_host.sum()) * HK * D * k.element_size()
        name = "decode-ragged " + str(kv_dtype).removeprefix("torch.")
        configs = [(None, None, None), (64, 4, 3), (64, 4, 5), (128, 4, 3), (128, 4, 4), (128, 8, 4)]
        runs = [("batch", None, 1, c) for c in configs] + [("longest", longest_first, 1, configs[0])]
        runs += [("batch", None, 2, configs[0])]
        for order, perm, splits, (block_n, warps, stages) in runs:
            lens = lens_host.cuda() if perm is None else lens_host.cuda()[perm]
            t = tables if perm is None else tables[perm].contiguous()
            qq = q if perm is None else q[perm].contiguous()
            config = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
            call = partial(decode_attention, qq, k, v, t, lens, D**-0.5, max_context_len=1100, **config)
            try:
                ms = time_ms(call)
            except Exception as error:
                print(f"{name} {order} {splits} {block_n}/{warps}/{stages}: {type(error).__name__}")
                continue
            tbps = nbytes / ms / 1e9
            cfg = "default" if block_n is None else f"{block_n}/{warps}/{stages}"
            label = f"{order} s{splits} {cfg}"
            rows.append((name, label, ms, f"{tbps:.2f} TB/s", f"{tbps / COPY_TBPS:.0%}", 0.0))
    return rows


def extend_rows() -> list[tuple]:
    rows = []
    # 8 prompts of 1,024 (a 1000 x 1000 prefill step), 8 chunks of 512 on 1,536 cached tokens, and
    # HF's workload's prefill step.
    ragged = ragged_prefill_lens(seed=2)
    cases = {
        "8x1024+0": ([1024] * 8, 0),
        "8x512+1536": ([512] * 8, 1536),
        f"{len(ragged)}x100-1024": (ragged, 0),
    }
    for kv_dtype, (case, (q_lens_host, prefix)) in itertools.product(
        (torch.bfloat16, torch.float8_e4m3fn), cases.items()
    ):
        call = extend_call(q_lens_host, prefix, kv_dtype)
        # causal work: every query attends to the prefix and to the new tokens up to itself
        flops = 4 * HK * GROUP * D * sum(n * prefix + n * (n + 1) / 2 for n in q_lens_host)
        reference = call()
        name = f"extend {str(kv_dtype).removeprefix('torch.')} {case}"
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
    rows = decode_rows(args) if "decode" in kernels else []
    rows += ragged_decode_rows(args) if "ragged" in kernels else []
    rows += extend_rows() if "extend" in kernels else []
    print(f"\n{'kernel':<34}{'config':>24}{'ms':>9}{'rate':>16}{'of limit':>9}{'max err':>9}")
    for name, label, ms, rate, share, err in rows:
        print(f"{name:<34}{label:>24}{ms:>9.3f}{rate:>16}{share:>9}{err:>9.1e}")
    print("decode config = BLOCK_N/warps/stages; extend config = BLOCK_M/BLOCK_N/warps/stages")


if __name__ == "__main__":
    main()
