"""Why the FP8-KV decode kernel reads at half the rate of the bf16 one: kernel structures side by side.

Batch 256 x 1,500 context, one Llama-3-8B layer's cache (8 KV heads, group 4, head_dim 128, pages of
16). Each structure is a stripped-down copy of the decode stage-1 loop (one split, no row indirection)
so that only the tile shapes, operand order and conversions differ:
- `q.kT`: the library kernel's order, scores = q @ trans(k) (k loaded [N, D]);
- `q.kT-load`: k loaded as [D, N] by its pointers, scores = q @ kT (SGLang's order);
- `k.qT`: scores transposed, sT = k @ trans(q), so the tile is the MMA's A operand and no tile is
  transposed; then acc += trans(pT) @ v;
- `fp8-mma`: q and p rounded to E4M3 before both products (a diagnostic: it changes the numerics; for
  a 16-row tile on sm90 Triton still converts the operands to fp16 for mma.sync, as the SASS shows);
- `load-only`: the same loads summed, no products (not pipelined by Triton: a latency-bound floor);
- `library`: `decode_attention` itself at the given tile, warps and stages;
  Since 2026-11-29 the library's FP8 loop reads the cache as int16 words, two
  E4M3 -> fp16 per cvt, even and odd head dimensions kept apart: 0.21 ms (128 keys, 4 warps, 5 stages)
  where these loops take 0.30-0.47. Compiled for sm90 it has 7.2 instructions per key per warp against
  10.9 for `q.kT`, whose transposed E4M3 tile Triton reads from shared memory a byte at a time (128
  LDS.U8 per 128 keys). Times before that change include the library wrapper's launch overhead (each
  call was synchronised); `time_ms` now queues the calls back to back.
(A run on 2026-11-29 timed a head-packed loop, 4 KV heads per program with a
block-diagonal q: 0.43 ms at best (32 keys, 4 warps, 5 stages), no better than the library; dropped.)
Each runs on two cache layouts: NHD ([blocks, page, heads, D], the engine's: a head's page is 16 rows
of 128-256 bytes, 1-2 KiB apart) and HND ([blocks, heads, page, D]: a head's page is contiguous).
(Run 2 of this script also tried a head-first grid order: no difference.)

    python benchmarks/fp8_decode_sweep.py [--batch 256 --context 1500]
    python benchmarks/fp8_decode_sweep.py --modes library --layouts NHD \
        --configs 64/4/5,128/4/5,128/4/3,256/4/5,128/8/5,64/8/5,128/2/5
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import triton
import triton.language as tl
from attention_sweep import time_ms  # benchmarks/ is on the path when this runs as a script

from tensorjet.kernels.decode_attention import decode_attention

COPY_TBPS = 4.25
MODES = {"q.kT": 0, "q.kT-load": 1, "k.qT": 2, "fp8-mma": 3, "load-only": 4, "library": 5}


@triton.jit
def _variant_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    qk_scale,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_bt,
    HK: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    MODE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(lens_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q_offsets = seq.to(tl.int64) * HK * GROUP * D + heads[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=g_mask[:, None], other=0.0)
    compute = q.dtype
    if MODE == 3:
        q = q.to(tl.float8e4nv)
    q_t = tl.trans(q)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    total = tl.zeros([D], dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_kh
    for n0 in range(0, ctx, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < ctx
        page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        rows = page * stride_kb + (offs_n % PAGE).to(tl.int64) * stride_ko
        v = tl.load(v_base + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        if MODE == 4:
            k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            total += tl.sum(k.to(tl.float32), 0) + tl.sum(v.to(tl.float32), 0)
        elif MODE == 2:
            k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            s_t = tl.dot(k.to(compute), q_t) * qk_scale  # [BLOCK_N, BLOCK_G]
            s_t = tl.where(n_mask[:, None], s_t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_t, 0))
            alpha = tl.exp2(m_i - m_new)
            p_t = tl.exp2(s_t - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p_t, 0)
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p_t.to(compute)), v.to(compute))
            m_i = m_new
        else:
            if MODE == 1:
                k_t = tl.load(k_base + rows[None, :] + offs_d[:, None], mask=n_mask[None, :], other=0.0)
                qk = tl.dot(q, k_t.to(compute))
            elif MODE == 3:
                k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
                qk = tl.dot(q, tl.trans(k))
            else:
                k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
                qk = tl.dot(q, tl.trans(k.to(compute)))
            qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if MODE == 3:
                pv = tl.dot(p.to(tl.float8e4nv), v)
            else:
                pv = tl.dot(p.to(compute), v.to(compute))
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    if MODE == 4:
        o = acc + total[None, :]
    else:
        o = acc / l_i[:, None]
    tl.store(out_ptr + q_offsets, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def run_variant(mode, q, k, v, tables, lens, scale, out, block_n, warps, stages):
    batch, hq, d = q.shape
    _, page, hk, _ = k.shape
    if mode == 5:  # the library kernel itself
        config = dict(num_splits=1, block_n=block_n, num_warps=warps, num_stages=stages)
        return decode_attention(q, k, v, tables, lens, scale, out, **config)
    _variant_kernel[(batch, hk)](
        q, k, v, tables, lens, out, scale * 1.4426950408889634,
        k.stride(0), k.stride(1), k.stride(2), tables.stride(0),
        HK=hk, GROUP=hq // hk, BLOCK_G=16, D=d, BLOCK_N=block_n, PAGE=page, MODE=mode,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--layouts", default="NHD,HND")
    parser.add_argument("--configs", default="64/4/3,128/4/2,128/4/3,128/8/3,256/4/2,256/8/2")
    parser.add_argument(
        "--pool_blocks", type=int, default=0, help="spread the pages over a pool this large (the engine's)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    hk, group, d, page = 8, 4, 128, 16
    blocks_per_seq = -(-args.context // page)
    num_blocks = max(args.batch * blocks_per_seq, args.pool_blocks)
    pages = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)[: args.batch * blocks_per_seq]
    tables = pages.view(args.batch, blocks_per_seq)
    lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    scale = d**-0.5
    rows = []
    modes = [(m, MODES[m]) for m in args.modes.split(",")]
    configs = [tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")]
    for (kv_dtype, q_dtype), layout in itertools.product(
        ((torch.bfloat16, torch.bfloat16), (torch.float8_e4m3fn, torch.float16)), args.layouts.split(",")
    ):
        q = torch.randn(args.batch, hk * group, d, device="cuda").to(q_dtype)
        shape = (num_blocks, page, hk, d) if layout == "NHD" else (num_blocks, hk, page, d)
        k, v = (torch.randn(shape, device="cuda").to(kv_dtype) for _ in range(2))
        if layout == "HND":  # a head's page is one contiguous run; the kernels see it through strides
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        nbytes = 2 * args.batch * args.context * hk * d * k.element_size()
        name = str(kv_dtype).removeprefix("torch.") + " " + layout
        reference = decode_attention(q, k, v, tables, lens, scale, num_splits=1)
        ms = time_ms(partial(decode_attention, q, k, v, tables, lens, scale, num_splits=1))
        rows.append((name, "library", "default", ms, nbytes / ms / 1e9, 0.0))
        for (mode_name, mode), (block_n, warps, stages) in itertools.product(modes, configs):
            if mode == 3 and kv_dtype == torch.bfloat16:
                continue
            out = torch.full_like(q, float("nan"))
            config = f"{block_n}/{warps}/{stages}"
            try:
                launch = partial(run_variant, mode, q, k, v, tables, lens, scale, out, block_n, warps, stages)
                ms = time_ms(launch)
            except Exception as error:  # out of shared memory or registers, or no such MMA
                print(f"{name} {mode_name} {config}: {type(error).__name__} {str(error)[:80]}")
                continue
            err = float("nan") if mode == 4 else (out.float() - reference.float()).abs().max().item()
            rows.append((name, mode_name, config, ms, nbytes / ms / 1e9, err))
    print(f"\n{'kv cache':<18}{'structure':<11}{'N/warps/stages':>18}{'ms':>8}{'TB/s':>7}{'max err':>9}")
    for name, mode_name, config, ms, tbps, err in rows:
        print(f"{name:<18}{mode_name:<11}{config:>18}{ms:>8.3f}{tbps:>7.2f}{err:>9.1e}")
    print(f"copy rate {COPY_TBPS} TB/s")


if __name__ == "__main__":
    main()
