"""SwiGLU activation, silu(gate) * up over the last dim [gate | up], in one pass (fp32 math)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import next_pow2
from tensorjet.kernels.reference import silu_and_mul_ref

__all__ = ["silu_and_mul", "silu_and_mul_ref"]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [..., 2I] -> [..., I]."""
    n_cols = gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*gate_up.shape[:-1], n_cols), dtype=gate_up.dtype, device=gate_up.device)
    out2 = out.view(-1, n_cols)
    block = min(1024, next_pow2(n_cols))
    if x2.shape[0]:
        grid = (x2.shape[0], triton.cdiv(n_cols, block))
        _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), n_cols, BLOCK=block, num_warps=4)
    return out
