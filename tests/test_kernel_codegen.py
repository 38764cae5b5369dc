"""What the attention kernels compile to on Hopper, checked on any machine (tests/sm90_codegen.py).

Two properties that the GPU only shows as speed, each once measured away by an innocent change:
- Triton's pipeliner spends a stage on a masked block-table load that K/V addresses depend on, so such
  a paged loop below 5 stages keeps one K/V buffer and overlaps nothing (benchmarks/attention_sweep.py);
  the extend kernel's maskless loop over whole prefix tiles keeps two at its 3 stages;
- an E4M3 tile read as bytes is loaded from shared memory one byte at a time (LDS.U8) for the
  transposed key operand, which made the FP8 decode loop slower than the bf16 one per key.
And the INT4 GEMVs, whose batch-1 speed their instruction count per weight bounds (the dequantization is
ALU work on every 4-bit value): each candidate tile keeps its dequantized weights in registers (no
shared-memory round trip, no spills) and spends at most 10 instructions per weight; no INT4 GEMM tile
spills registers. Nor does any tile of the 2-16-row fused GEMV, with any of its fusions, and each fits
the GPU's shared memory at the pipeline depth it is launched with (fp32 tiles too).
"""

import pytest
from sm90_codegen import run_census_in_subprocess

pytestmark = [pytest.mark.codegen, pytest.mark.slow]  # ptxas compiles Llama-3-8B's configurations


def spills(loop: dict) -> int:
    """Local-memory stores and loads in a loop: registers spilled."""
    return sum(n for op, n in loop["opcodes"].items() if op.startswith(("STL", "LDL")))


@pytest.fixture(scope="module")
def census() -> dict:
    return run_census_in_subprocess()


@pytest.mark.parametrize("rows", ["", "_8_rows"])
def test_fp8_decode_loop_double_buffers_and_never_loads_single_bytes(census, rows):
    loop = census[f"decode_fp8{rows}"]
    assert loop["kv_buffers"] and min(loop["kv_buffers"]) >= 2, f"K/V not double-buffered: {loop}"
    byte_loads = {op: n for op, n in loop["opcodes"].items() if op.startswith(("LDS.U8", "LDS.S8"))}
    assert not byte_loads, f"the FP8 decode loop loads shared memory byte by byte: {byte_loads}"
    assert loop["opcodes"].get("F2FP.F16.E4M3.UNPACK_B", 0) > 0, "E4M3 pairs are not converted by one cvt"
    assert not spills(loop), f"the FP8 decode loop spills registers: {loop}"


@pytest.mark.parametrize("rows", ["", "_8_rows"])
def test_bf16_decode_loop_never_spills(census, rows):
    """One query row per sequence and eight (a verify step's rows in one 32-row tile) alike."""
    loop = census[f"decode_bf16{rows}"]
    assert not spills(loop), f"the decode loop spills registers: {loop}"


def test_bf16_extend_loop_double_buffers(census):
    loop = census["extend_bf16"]
    assert loop["kv_buffers"] and min(loop["kv_buffers"]) >= 2, f"K/V not double-buffered: {loop}"


@pytest.mark.parametrize("kind", ["int4_gemv", "int4_fused"])
def test_int4_gemv_loops_stay_in_registers_and_short(census, kind):
    loops = {name: loop for name, loop in census.items() if name.startswith(kind)}
    assert loops, f"no {kind} loop compiled"
    for name, loop in loops.items():
        ops = loop["opcodes"]
        assert not spills(loop), f"{name} spills registers: {loop}"
        per_weight = loop["loop_instructions"] / loop["weights_per_thread"]
        assert per_weight <= 10, f"{name}: {per_weight:.1f} instructions per weight: {ops}"
        staged = ops.get("STS.U16", 0) / loop["weights_per_thread"]
        assert staged < 0.5, f"{name} stores its dequantized weights to shared memory: {ops}"


def test_int4_gemm_loops_never_spill_registers(census):
    loops = {name: loop for name, loop in census.items() if name.startswith("int4_gemm")}
    assert loops, "no int4_gemm loop compiled"
    for name, loop in loops.items():
        assert not spills(loop), f"{name} spills registers: {loop}"


def test_fused_rows_loops_never_spill_and_fit_shared_memory(census):
    from sm90_codegen import H100_SHARED_MEMORY

    loops = {name: loop for name, loop in census.items() if name.startswith("fused_rows")}
    assert loops, "no fused_rows loop compiled"
    for name, loop in loops.items():
        assert not spills(loop), f"{name} spills registers: {loop}"
        assert loop["shared_memory"] <= H100_SHARED_MEMORY, f"{name} takes {loop['shared_memory']} bytes"
