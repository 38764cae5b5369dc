"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control, for programmatic dependent launch (Triton 3.6 has it; older ones may not)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # older Triton: kernels launch the usual way (`pdl_enabled` is False)
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 tensors (no TF32), the default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 132 (an H100/H200) where there is no GPU (interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def as_int32(x, device: torch.device) -> torch.Tensor:
    """A Python list or tensor as a contiguous int32 tensor on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int32).contiguous()
    return torch.tensor(list(x), dtype=torch.int32, device=device)


def host_max(x) -> int:
    """max() of a list or tensor (a device sync for a GPU tensor: pass the value in where it is known)."""
    if isinstance(x, torch.Tensor):
        return int(x.max().item()) if x.numel() else 0
    return max(x, default=0)


def with_overrides(tuned: tuple[int, ...], given: tuple[int | None, ...]) -> tuple[int, ...]:
    """A tuned launch configuration with each value the caller gave (not None) in its place."""
    return tuple(default if value is None else value for value, default in zip(given, tuned))


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_upcast(dtype: torch.dtype) -> bool:
    """The Triton interpreter's `tl.dot` multiplies bf16 operands as raw uint16 bits (garbage), so under
    the interpreter bf16 dot operands are upcast to fp32 first (after any rounding to bf16, which
    keeps the GPU's numerics). Compiled kernels never take this path."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def tl_dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """`tl.dot(a, b)` with fp32 accumulation; see `dot_upcast` for UPCAST."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _compiled_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability kernels on `device` are compiled for; (0, 0) where nothing is compiled
    (the CPU, the interpreter)."""
    if device.type != "cuda" or interpreting():
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch for kernels on `device`: compiled kernels on Hopper or later.

    A kernel launched this way may start while the previous one in the stream finishes: its programs
    fetch what does not depend on that kernel (weights) and then wait (`wait_for_previous_kernel`);
    the previous kernel lets it launch once past its main loop (`launch_next_kernel`).
    Inside a CUDA graph this hides ~1 us of launch gap and ramp per kernel (benchmarks/pdl_probe.py:
    1.0-1.3 us per GEMV on the H200). TENSORJET_PDL=0 turns it off (for A/B runs)."""
    if not HAS_PDL or os.environ.get("TENSORJET_PDL", "1") == "0":
        return False
    return _compiled_capability(device) >= (9, 0)


def pdl_launch(enabled: bool) -> dict:
    """Launch keyword arguments for a kernel compiled with PDL=enabled."""
    return {"launch_pdl": True} if enabled else {}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished and its writes are visible. Every program
    of a PDL kernel calls this before reading anything the previous kernel wrote, and before it exits
    (so a kernel never completes ahead of its predecessor)."""
    if PDL:
        gdc_wait()


@triton.jit
def launch_next_kernel(PDL: tl.constexpr):
    """With PDL: the next kernel may start launching once every program got here. Called after a
    kernel's main loop, not at its start: triggered at the start, a chain of kernels would all be
    resident and waiting at once, holding SM slots the running kernel's later waves need."""
    if PDL:
        gdc_launch_dependents()


def supports_e4m3_cvt(device: torch.device) -> bool:
    """PTX converts a pair of E4M3 values to fp16 in one instruction from sm_89 (Ada, Hopper) on."""
    return _compiled_capability(device) >= (8, 9)


@triton.jit
def e4m3_pairs(words, CVT_ASM: tl.constexpr):
    """int16 words, each two E4M3 values, as (low bytes, high bytes) in fp16 (exact: fp16 holds every
    E4M3 value). With CVT_ASM one `cvt.rn.f16x2.e4m3x2` per word, else byte by byte (the interpreter,
    GPUs before sm_89)."""
    if CVT_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
            "=h,=h,h",
            [words],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    else:
        lo = (words & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        hi = ((words >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        return lo, hi


@triton.jit
def as_f16(x):
    """bf16 -> fp16, saturated. With an FP8 cache the tiles are converted to fp16 (one instruction from
    E4M3, against three to bf16) and q follows; fp16 holds bf16 values exactly from 6e-5 to 65504."""
    return tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
