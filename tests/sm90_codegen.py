"""Compile the attention kernels for Hopper (sm_90) on any machine and report what the main loop became.

Triton's wheel carries ptxas and nvdisasm, so a machine without a GPU can check code-generation
properties that a GPU only shows as speed:
- how many K/V tiles the software pipeliner keeps in shared memory (its buffers), and
- which SASS instructions the main loop issues (e.g. `LDS.U8`: a shared-memory load of one byte).

Run as a script it prints a JSON census per kernel at the library's launch configuration; the tests
run it in a subprocess, since the test process may have the Triton interpreter switched on.

    python tests/sm90_codegen.py
"""

from __future__ import annotations

import collections
import importlib
import inspect
import json
import os
import re
import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int, not_specialized=()):
    """Compile `kernel` for sm_90 as the JIT would specialise it: integer and pointer arguments not in
    `not_specialized` are taken as multiples of 16 (`types` names the pointers' and floats' types)."""
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    plain = ("constexpr", "fp32")
    aligned = [i for i, p in enumerate(params) if signature[p] not in plain and p not in not_specialized]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs=dict(constexprs),
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def main_loop_census(compiled, keys_per_iteration: int) -> dict:
    """Shared-memory copies of each pipelined K/V tile and the opcodes of the longest loop in the SASS."""
    ttgir = compiled.asm["ttgir"]
    allocations = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x(\d+)x(\d+)x", ttgir)
    # K and V tiles: [copies, keys, head_dim (or words)] allocations; copies = tiles in flight + 1
    kv_buffers = [int(copies) for copies, rows, _ in allocations if int(rows) == keys_per_iteration]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sm90_codegen_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        disassembler = os.path.join(BIN, "nvdisasm")
        sass = subprocess.run([disassembler, "-c", path], capture_output=True, text=True, check=True)
    finally:
        os.remove(path)
    lines = sass.stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.L_x_(\d+):", line))}
    loops = [
        (labels[m.group(1)], i)
        for i, line in enumerate(lines)
        if (m := re.search(r"BRA.*\.L_x_(\d+)", line)) and labels.get(m.group(1), i) < i
    ]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    opcodes: collections.Counter = collections.Counter()
    for line in lines[start : end + 1]:
        if m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_.]+)?)", line):
            opcodes[m.group(1)] += 1
    count = sum(opcodes.values())
    return {
        "kv_buffers": kv_buffers,
        "loop_instructions": count,
        "per_key": count / keys_per_iteration,
        "opcodes": dict(opcodes.most_common()),
    }


def census() -> dict:
    """The decode stage 1 (bf16 and FP8 caches, one and eight query rows per sequence) and the bf16
    extend kernel at the library's configurations for Llama-3-8B's attention (head_dim 128, group 4,
    pages of 16)."""
    decode = importlib.import_module("tensorjet.kernels.decode_attention")
    extend = importlib.import_module("tensorjet.kernels.extend_attention")
    out = {}
    pointers = [
        "block_tables_ptr",
        "context_lens_ptr",
        "rows_ptr",
        "query_lens_ptr",
        "q_start_ptr",
        "q_lens_ptr",
    ]
    types = {p: "*i32" for p in pointers} | {"qk_scale": "fp32", "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32"}
    fp8_decode = types | {"q_ptr": "*bf16", "out_ptr": "*bf16", "k_words_ptr": "*i16", "v_words_ptr": "*i16"}
    bf16_decode = types | {p: "*bf16" for p in ("q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr")}
    # One query row per sequence, and up to 8 (drafts to verify: 8 rows x group 4 in a 32-row tile).
    for rows, block_m in ((1, 16), (8, 32)):
        constexprs = dict(GROUP=4, BLOCK_M=block_m, HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=16)
        constexprs |= dict(HAS_ROWS=rows > 1, QROWS=rows, MULTI_ROW=rows > 1, DIRECT=True, PDL=True)
        constexprs |= dict(DOT_PREC="tf32", UPCAST=False)
        suffix = "" if rows == 1 else f"_{rows}_rows"
        compiled = compile_sm90(
            decode._decode_fp8_stage1_kernel, fp8_decode,
            constexprs | dict(BLOCK_N=decode.FP8_BLOCK_N, F16_COMPUTE=True, CVT_ASM=True),
            decode.FP8_NUM_WARPS, decode.FP8_NUM_STAGES, not_specialized=("stride_bt",),
        )  # fmt: skip
        out[f"decode_fp8{suffix}"] = main_loop_census(compiled, decode.FP8_BLOCK_N)
        compiled = compile_sm90(
            decode._decode_stage1_kernel, bf16_decode, constexprs | dict(BLOCK_N=decode.BLOCK_N),
            decode.NUM_WARPS, decode.NUM_STAGES, not_specialized=("stride_bt",),
        )  # fmt: skip
        out[f"decode_bf16{suffix}"] = main_loop_census(compiled, decode.BLOCK_N)

    block_m, block_n, warps, stages = extend._block_sizes(128, torch.bfloat16, torch.device("cuda"))
    bf16_extend = types | {p: "*bf16" for p in ("q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr")}
    constexprs = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=16)
    constexprs |= dict(DOT_PREC="tf32", UPCAST=False, F16_COMPUTE=False)
    compiled = compile_sm90(extend._extend_kernel, bf16_extend, constexprs, warps, stages, ("stride_bt",))
    out["extend_bf16"] = main_loop_census(compiled, block_n)
    out |= int4_census()
    out |= fused_rows_census()
    return out


H100_SHARED_MEMORY = 232448  # bytes a block may opt into on sm_90


def fused_rows_census() -> dict:
    """The 2-16-row fused GEMV's main loop at each candidate tile with each of its fusions (bf16), and
    the shared memory each takes in bf16 and fp32 at the stages `stages_that_fit` gives it."""
    fused = importlib.import_module("tensorjet.kernels.fused_gemv")
    fusions = {
        "norm": dict(NORM=True, SILU_MUL=False, ADD_TO_Y=False),
        "norm_silu": dict(NORM=True, SILU_MUL=True, ADD_TO_Y=False),
        "residual": dict(NORM=False, SILU_MUL=False, ADD_TO_Y=True),
    }
    out = {}
    for dtype, size, precision in (("bf16", 2, "tf32"), ("fp32", 4, "ieee")):
        pointers = {p: f"*{dtype}" for p in ("x_ptr", "w_ptr", "b_ptr", "norm_w_ptr", "y_ptr")}
        pointers["eps"] = "fp32"
        for i, c in enumerate(fused.ROWS_CANDIDATES):
            tiles = dict(BLOCK_M=fused.MAX_FUSED_ROWS, BLOCK_N=c.block_n, BLOCK_K=c.block_k)
            for name, fusion in fusions.items():
                stages = fused.stages_that_fit(c, size, fusion["SILU_MUL"], H100_SHARED_MEMORY)
                constexprs = tiles | fusion | dict(HAS_BIAS=False, DOT_PREC=precision, UPCAST=False, PDL=True)
                compiled = compile_sm90(
                    fused._fused_rows_kernel, pointers, constexprs, c.num_warps, stages, ("M",)
                )
                key = f"fused_rows_{dtype}_{i}_{name}"
                out[key] = main_loop_census(compiled, c.block_k) if dtype == "bf16" else {"opcodes": {}}
                out[key]["shared_memory"] = compiled.metadata.shared
    return out


def int4_census() -> dict:
    """The INT4 GEMV's, GEMM's and fused batch-1 GEMV's main loops at each candidate tile (bf16, group
    128, zero points, slices made two at a time where the GPU's launch makes them so; split-K
    candidates share their tile's loop), with the weights each loop iteration multiplies per thread."""
    int4 = importlib.import_module("tensorjet.kernels.int4_linear")
    fused = importlib.import_module("tensorjet.kernels.int4_fused_gemv")
    pointers = {
        "x_ptr": "*bf16",
        "qw_ptr": "*i32",
        "scale_ptr": "*bf16",
        "zero_ptr": "*u8",
        "perm_ptr": "*i32",
    }
    pointers |= {"b_ptr": "*bf16", "y_ptr": "*bf16", "partial_ptr": "*fp32", "arrivals_ptr": "*i32"}
    layout = dict(GROUP=128, HAS_ZEROS=True, HAS_PERM=False, HAS_BIAS=False, SCALE_AFTER=True)
    layout |= dict(DOT_PREC="tf32", UPCAST=False)
    out = {}
    gemms = {f"int4_gemv_{i}": c for i, c in enumerate(c for c in int4.GEMV_CANDIDATES if c.split_k == 1)}
    gemms |= {f"int4_gemm_{i}": c for i, c in enumerate(int4.GEMM_CANDIDATES)}
    for name, c in gemms.items():
        tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k)
        tiles |= dict(SCALE_AFTER=c.scale_after, UNPACK=int4.UNPACKINGS.index(c.unpack), WHOLE_TILES=True)
        # as a bf16 launch on a GPU sets it
        tiles |= dict(PAIRS=c.scale_after or c.unpack == "spread")
        compiled = compile_sm90(
            int4._int4_matmul_kernel, pointers, layout | tiles, c.num_warps, c.num_stages, ("M",)
        )
        out[name] = main_loop_census(compiled, c.block_k)
        out[name]["weights_per_thread"] = c.block_n * c.block_k / (32 * c.num_warps)
    fusion = dict(NORM=True, SILU_MUL=True, ADD_TO_Y=False, X_BLOCK=4096, PDL=True, PAIRS=True)
    for i, c in enumerate(c for c in fused.CANDIDATES if c.split_k == 1):
        tiles = dict(BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k, FMA=c.fma)
        types = pointers | {"norm_w_ptr": "*bf16", "eps": "fp32"}
        compiled = compile_sm90(
            fused._int4_fused_gemv_kernel, types, layout | fusion | tiles, c.num_warps, c.num_stages
        )
        out[f"int4_fused_{i}"] = main_loop_census(compiled, c.block_k)
        out[f"int4_fused_{i}"]["weights_per_thread"] = 2 * c.block_n * c.block_k / (32 * c.num_warps)
    return out


def run_census_in_subprocess() -> dict:
    """census() in a fresh interpreter without TRITON_INTERPRET (compiled kernels, not interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, f"sm90 compile failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


if __name__ == "__main__":
    print(json.dumps(census(), indent=1))
