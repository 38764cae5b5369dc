"""Rotary position embedding (rotate-half layout, as HF Llama/Mistral/Qwen use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Rope types whose frequencies do not depend on the running sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def rope_parameters(config: PretrainedConfig) -> dict:
    """Rope settings under transformers 5 (`rope_parameters`) or 4 (`rope_theta`/`rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {STATIC_ROPE_TYPES})")
    if rope_type == "default":
        base = float(params["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # a scaled rope: a transformers config

    # Made where the model is being built (a `with torch.device(...)` block), like the default rope's.
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.empty(0).device)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)
        # A fused in-place kernel with the same numerics (`tensorjet.kernels.rotary.apply_rotary`),
        # set by the runner on the Triton path: one launch instead of about eighteen.
        self.kernel = None
        # Every layer rotates at the same positions: gather the tables once per step.
        self._step_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D]; rotates both at their token positions."""
        if self.kernel is not None:
            return self.kernel(positions, q, k, self.cos, self.sin)
        cos, sin = self._tables(positions)
        # q and k side by side: one pass of the elementwise ops instead of one per tensor.
        qk = _rotate(torch.cat((q, k), dim=1), cos, sin)
        return qk.split([q.shape[1], k.shape[1]], dim=1)

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and sign-folded sin for `positions`, reused while the same tensor comes back."""
        if self._step_tables is None or self._step_tables[0] is not positions:
            cos, sin = self.cos[positions], self.sin[positions]
            # x*[cos|cos] + [x2|x1]*[-sin|sin] is exactly [x1 cos - x2 sin | x2 cos + x1 sin].
            self._step_tables = (
                positions,
                torch.cat((cos, cos), -1)[:, None],
                torch.cat((-sin, sin), -1)[:, None],
            )
        return self._step_tables[1], self._step_tables[2]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((x2, x1), dim=-1) * sin_signed).to(x.dtype)
