"""AWQ (Lin et al., 2023): activation-aware weight quantization. The input channels that carry large
activations matter most, so before rounding, each input channel of a group of linear layers that read
the same input is multiplied by a scale s (W' = W diag(s)) and the op that produces that input divides
its output by s (an RMSNorm's weight, or the rows of a preceding linear layer): the float model computes
the same function, and the salient channels get finer steps on the grid.

The scales are searched over a grid, s = x_mean^r / w_mean^(1 - r) for r in [0, 1) (`n_grid` points,
normalized so that max(s) min(s) = 1), x_mean the mean |x| of each input channel over the calibration
tokens and w_mean the mean of each column's weights normalized by their group's largest (AutoAWQ's and
llm-compressor's "duo" scaling); plus s = 1, so the search never does worse than no scaling. Each
candidate is scored by the squared error of the block's output (the attention block for q|k|v, the
MLP for gate|up, the layer itself otherwise) with the group's weights rounded to the grid against the
float output.

The optional clipping search then shrinks each group's range (its largest |w|, in steps of 1/`n_grid`
down to half) where that lowers the squared error of the layer's own output on a sample of tokens
(AutoAWQ does it for every layer but q and k, whose errors the attention softmax scores non-linearly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tensorjet.calibration.quantizer import QuantScheme, fake_quantize, grouped

DEFAULT_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512  # tokens the clipping search measures on (AutoAWQ's sample)
CLIP_ROWS_PER_BATCH = 256  # output rows per step of the clipping search (bounds its [T, rows, G] buffer)


def weight_column_means(weights: Sequence[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """Mean over every row of `weights` (all [N_i, K]) of |w| / (its group's max |w|), per column."""
    k = weights[0].shape[1]
    total = torch.zeros(k, dtype=torch.float32, device=weights[0].device)
    rows = 0
    for w in weights:
        groups = grouped(w.float().abs(), scheme)
        normalized = (groups / (groups.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape[0], -1)[:, :k]
        total += normalized.sum(0)
        rows += w.shape[0]
    return total / rows


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int) -> list[torch.Tensor]:
    """Scale 1 (identity), then the grid's duo scales."""
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    candidates = [ones]
    x_mean, w_mean = x_mean.float(), w_mean.float()
    for i in range(n_grid):
        ratio = i / n_grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        candidates.append(torch.nan_to_num(s, nan=1.0, posinf=1.0, neginf=1.0))
    return candidates


def search_scales(
    x_mean: torch.Tensor,
    weights: Sequence[torch.Tensor],
    loss_of: Callable[[list[torch.Tensor]], float],
    scheme: QuantScheme,
    n_grid: int = DEFAULT_GRID,
) -> tuple[torch.Tensor, list[float]]:
    """The candidate scale [K] whose quantized weights Q(W s) / s give the lowest `loss_of` (the block's
    output error with those weights in place of `weights`), and every candidate's loss (scale 1 first)."""
    w_mean = weight_column_means(weights, scheme)
    losses = []
    best, best_loss = None, float("inf")
    for s in candidate_scales(x_mean, w_mean, n_grid):
        s_row = s.to(weights[0].dtype)[None, :]
        trial = [fake_quantize(w * s_row, scheme) / s_row for w in weights]
        loss = loss_of(trial)
        losses.append(loss)
        if loss < best_loss:  # strictly lower: a tie keeps the earlier (scale 1 first)
            best, best_loss = s, loss
    if best is None:
        raise ValueError("every AWQ scale candidate gave a non-finite loss (NaN in the block's outputs)")
    return best, losses


def search_clipping(
    weight: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, n_grid: int = DEFAULT_GRID
) -> torch.Tensor:
    """Each group's clipped extent [N, G]: the one of max|w| (1 - i / n_grid), i < n_grid * CLIP_MAX_SHRINK,
    that gives the layer's output on `x` [T, K] (evenly spaced tokens are used) the least squared error."""
    n, k = weight.shape
    if x.shape[0] > CLIP_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, CLIP_TOKENS, device=x.device).long()]
    pad = -k % scheme.group_columns(k)
    x_groups = torch.nn.functional.pad(x.float(), (0, pad)).view(x.shape[0], -1, scheme.group_columns(k))
    best = []
    for start in range(0, n, CLIP_ROWS_PER_BATCH):
        w = weight[start : start + CLIP_ROWS_PER_BATCH].float()
        w_groups = grouped(w, scheme)  # [rows, G, size]
        reference = torch.einsum("tgc,ngc->tng", x_groups, w_groups)
        extent = w_groups.abs().amax(-1)  # [rows, G]
        best_extent, best_error = extent.clone(), torch.full_like(extent, float("inf"))
        for i in range(int(n_grid * CLIP_MAX_SHRINK)):
            trial = extent * (1 - i / n_grid)
            q = grouped(fake_quantize(w, scheme, trial), scheme)
            error = (torch.einsum("tgc,ngc->tng", x_groups, q) - reference).pow(2).mean(0)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_extent = torch.where(better, trial, best_extent)
        best.append(best_extent)
    return torch.cat(best)
