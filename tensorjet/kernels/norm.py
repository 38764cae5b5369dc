"""Fused RMSNorm (optionally with the residual add) in one pass over each row.

Numerics follow `tensorjet.layers.norm.RMSNorm`: with a residual, the sum x + residual is rounded to
the input dtype (it is also the new residual), the norm runs in fp32, the normalised row is rounded to
the input dtype and then scaled by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tensorjet.kernels._common import next_pow2
from tensorjet.kernels.reference import rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., H]; with `residual`, returns (norm(x + residual), x + residual)
    like `RMSNorm.forward`. `out` / `residual_out` may alias x / residual (in-place update)."""
    shape = x.shape
    n_cols = shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if out is None:
        out = torch.empty(shape, dtype=torch.result_type(x, weight), device=x.device)
    out2 = out.view(-1, n_cols)
    has_res = residual is not None
    if has_res:
        r2 = residual.reshape(-1, n_cols)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        if residual_out is None:
            residual_out = torch.empty_like(x)
        ro2 = residual_out.view(-1, n_cols)
    else:
        r2 = ro2 = x2
    block = next_pow2(n_cols)
    if rows:
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out2,
            ro2,
            x2.stride(0),
            r2.stride(0),
            out2.stride(0),
            ro2.stride(0),
            n_cols,
            eps,
            BLOCK=block,
            HAS_RES=has_res,
            num_warps=min(16, max(1, block // 512)),
        )
    return (out, residual_out) if has_res else out
