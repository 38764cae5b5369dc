"""One attention kernel launch for Nsight Compute to read: the warm-up compiles, the second call is the
one to profile (`ncu --launch-skip 1 --launch-count 1`).

Cases (Llama-3-8B attention, one layer, pages of 16):
- decode-ragged: batch 256, contexts 200-1,100 (HF's workload's decode steps);
- decode-long: batch 256 x 1,465 (the 1000 x 1000 workload's middle);
- extend-ragged: 100-1,024-token prompts up to 8,192 tokens (HF's workload's prefill step).

    ncu --clock-control none --launch-skip 1 --launch-count 1 --set full \
        python benchmarks/attention_ncu.py --case decode-ragged --kv_dtype fp8
"""

from __future__ import annotations

import argparse

import torch
from attention_sweep import (  # noqa: E402  (benchmarks/ is on the path)
    GROUP,
    HK,
    PAGE,
    D,
    extend_call,
    paged_kv,
    ragged_decode_lens,
    ragged_prefill_lens,
)

from tensorjet.kernels.decode_attention import decode_attention


def decode_call(lens_host: list[int], kv_dtype: torch.dtype):
    batch, longest = len(lens_host), max(lens_host)
    blocks_per_seq = -(-longest // PAGE)
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    k, v = paged_kv(num_blocks, kv_dtype)
    q = torch.randn(batch, HK * GROUP, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(lens_host, device="cuda", dtype=torch.int32)
    return lambda: decode_attention(q, k, v, tables, lens, D**-0.5, max_context_len=longest)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["decode-ragged", "decode-long", "extend-ragged"], required=True)
    parser.add_argument("--kv_dtype", choices=["bf16", "fp8"], default="fp8")
    args = parser.parse_args()
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    if args.case == "decode-ragged":
        call = decode_call(ragged_decode_lens(256).tolist(), kv_dtype)
    elif args.case == "decode-long":
        call = decode_call([1465] * 256, kv_dtype)
    else:
        call = extend_call(ragged_prefill_lens(seed=1), 0, kv_dtype)
    call()  # compiles
    torch.cuda.synchronize()
    call()  # the launch to profile
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
