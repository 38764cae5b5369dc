"""The INT4 grid that every calibration method quantizes onto, and round-to-nearest (RTN) itself.

A weight [N, K] is cut into groups of `group_size` input columns (the last may be narrower when the
group size does not divide K; -1: one group per output row). Each group of each row has a scale and a
zero point: w ~= (code - zero) * scale, code in 0..15.
- symmetric (GPTQ's convention): scale = 2 max|w| / 15, zero = 8;
- asymmetric (AWQ's): scale = (max w - min w) / 15, zero = round(-min w / scale), clamped to 0..15.
Scales are rounded to fp16 before the codes are chosen: the checkpoint formats store fp16 scales, so
the weights a loader dequantizes are exactly those the calibration measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4,)
MAX_CODE = 15
SYMMETRIC_ZERO = 8
# The smallest scale kept (an fp16 subnormal): an all-zero group still dequantizes to zeros.
MIN_SCALE = 1e-5
WORD_CODES = 8  # codes per int32 word: groups are whole words


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized: bit width, group size and whether zero points are free."""

    bits: int = 4
    group_size: int = 128  # input columns per scale; -1: one scale per output row
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; tensorjet writes {SUPPORTED_BITS}-bit weights"
            )
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or (g > 0 and g % WORD_CODES == 0)):
            raise ValueError(
                f"group_size={g!r} is not supported; use a positive multiple of {WORD_CODES} (32, 64, 128, "
                "...) or -1 (one scale per output channel)"
            )

    def group_columns(self, in_features: int) -> int:
        """Columns per group of a K-column weight (a per-channel group spans every column)."""
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_columns(in_features))

    def group_index(self, in_features: int, device: torch.device | None = None) -> torch.Tensor:
        """The group of each input column, [K] int64."""
        return torch.arange(in_features, device=device) // self.group_columns(in_features)


@dataclass
class QuantizedWeight:
    """A weight on the grid: codes [N, K] uint8 in input-column order, scales [N, G] fp32 (fp16-exact),
    zero points [N, G] uint8, and the group of each input column [K]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(code - zero) * scale in fp32, rounded to `dtype`: what tensorjet's loaders compute."""
        g = self.g_idx.long()
        w = (self.codes.float() - self.zeros.float()[:, g]) * self.scales[:, g]
        return w.to(dtype)

    def rows(self, rows: slice) -> QuantizedWeight:
        return QuantizedWeight(self.codes[rows], self.scales[rows], self.zeros[rows], self.g_idx)

    def to_host(self) -> QuantizedWeight:
        return QuantizedWeight(*(t.cpu() for t in (self.codes, self.scales, self.zeros, self.g_idx)))


def grid_parameters(
    w: torch.Tensor, symmetric: bool, max_value: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of `w` [..., columns] (one group per row), both fp32 [...].
    `max_value` (same leading shape) replaces the row's extent: AWQ's clipping search shrinks it."""
    w = w.float()
    if symmetric:
        extent = w.abs().amax(-1) if max_value is None else max_value
        scale = _fp16_scale(2 * extent / MAX_CODE)
        return scale, torch.full_like(scale, SYMMETRIC_ZERO)
    high, low = w.amax(-1), w.amin(-1)
    if max_value is not None:
        high, low = high.clamp(max=max_value), low.clamp(min=-max_value)
    scale = _fp16_scale((high - low) / MAX_CODE)
    zero = torch.clamp(torch.round(-low / scale), 0, MAX_CODE)
    return scale, zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=MIN_SCALE).half().float()


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes of `w` on the grid (scale, zero broadcast against it), as float 0..15."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, MAX_CODE)


def quantize_rtn(
    weight: torch.Tensor, scheme: QuantScheme, max_value: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round every weight to its group's nearest code (the groups' extents, or `max_value` [N, G] where
    given, set the grid)."""
    n, k = weight.shape
    groups = grouped(weight.float(), scheme)  # [N, G, columns]
    scale, zero = grid_parameters(groups, scheme.symmetric, max_value)
    codes = to_codes(groups, scale[..., None], zero[..., None]).reshape(n, -1)[:, :k]
    return QuantizedWeight(
        codes.to(torch.uint8), scale, zero.to(torch.uint8), scheme.group_index(k, weight.device)
    )


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme, max_value: torch.Tensor | None = None):
    """`weight` rounded onto its grid and back, in its own dtype (AWQ's searches measure this).
    `max_value` [N, G]: each group's clipped extent."""
    n, k = weight.shape
    groups = grouped(weight.float(), scheme)
    scale, zero = grid_parameters(groups, scheme.symmetric, max_value)
    codes = to_codes(groups, scale[..., None], zero[..., None])
    w = (codes - zero[..., None]) * scale[..., None]
    return w.reshape(n, -1)[:, :k].to(weight.dtype)


def grouped(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """[N, K] -> [N, G, group columns]; a last partial group is padded by repeating its first column,
    which leaves its extent (and so its grid) unchanged."""
    n, k = weight.shape
    size = scheme.group_columns(k)
    pad = -k % size
    if pad:
        last = weight[:, k - (k % size) : k - (k % size) + 1]
        weight = torch.cat((weight, last.expand(n, pad)), dim=1)
    return weight.view(n, -1, size)
