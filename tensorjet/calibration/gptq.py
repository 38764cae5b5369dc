"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time, each column's rounding
error spread over the columns not yet quantized in proportion to the inverse Hessian of the layer's
squared output error, H = 2 X^T X / n over the calibration inputs X.

- lazy batch updates: columns are quantized in blocks of `block_size`; within a block the updates go to
  the block's own columns, and the rest of the weight takes the block's accumulated error in one matmul;
- damping: `damp` times the mean of diag(H) is added to the diagonal (more, retried, if H is still not
  positive definite), so columns the inputs barely span stay stable;
- act order: columns in decreasing order of diag(H) (the inputs that matter most are quantized first,
  while the most columns are left to absorb their error), with static groups: every group's scale and
  zero point are set from the weight before any update, so the groups stay contiguous in the
  checkpoint (no g_idx permutation for the kernels) whatever order the columns are quantized in.
  Without act order each group's grid is set from the updated weight as the quantization reaches it.
"""

from __future__ import annotations

import torch

from tensorjet.calibration.quantizer import QuantizedWeight, QuantScheme, grid_parameters, to_codes

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
MAX_DAMP_TRIES = 6


class Hessian:
    """H = 2 X^T X / n, accumulated over batches of inputs in fp32."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.num_rows + x.shape[0]
        self.matrix.mul_(self.num_rows / total)
        self.matrix.addmm_(x.T, x, alpha=2.0 / total)
        self.num_rows = total


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    act_order: bool = True,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> QuantizedWeight:
    """The GPTQ codes of `weight` [N, K] given the Hessian [K, K] of its inputs."""
    n, k = weight.shape
    w = weight.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = scheme.group_columns(k)
    num_groups = scheme.num_groups(k)
    scales = torch.empty(n, num_groups, device=w.device)
    zeros = torch.empty(n, num_groups, device=w.device)
    if act_order:  # static groups: every grid from the weight as it is
        for g in range(num_groups):
            scales[:, g], zeros[:, g] = grid_parameters(w[:, g * group : (g + 1) * group], scheme.symmetric)
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        order = torch.arange(k, device=w.device)
    w, h = w[:, order], h[order][:, order]
    h_inv = _inverse_hessian_factor(h, damp)
    codes = torch.empty(n, k, device=w.device)
    column_group = (order // group).tolist()
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            g = column_group[start + i]
            if not act_order and (start + i) % group == 0:  # this group's grid, from the updated weight
                rest = w[:, start + i : start + i + group].clone()
                rest[:, : end - start - i] = block[:, i : i + group]
                scales[:, g], zeros[:, g] = grid_parameters(rest, scheme.symmetric)
            column = block[:, i]
            code = to_codes(column, scales[:, g], zeros[:, g])
            codes[:, start + i] = code
            error = (column - (code - zeros[:, g]) * scales[:, g]) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    input_order = torch.empty_like(codes)
    input_order[:, order] = codes
    g_idx = scheme.group_index(k, w.device)
    return QuantizedWeight(input_order.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1, with more damping where H is not positive definite
    enough to factor."""
    k = h.shape[0]
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(k, device=h.device, dtype=h.dtype)
    for attempt in range(MAX_DAMP_TRIES):
        damped = h + (damp * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(
        f"the calibration inputs' Hessian is not positive definite even with damping "
        f"{damp * 10 ** (MAX_DAMP_TRIES - 1)}: too few or degenerate calibration samples"
    )
