import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """`silu_and_mul` as a layer, so that start-up can give it the fused kernel."""

    def __init__(self) -> None:
        super().__init__()
        # A fused kernel with the same numerics (`tensorjet.kernels.activation.silu_and_mul`), set at
        # start-up on the Triton path: one launch instead of three.
        self.kernel = None

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(gate_up)
        return silu_and_mul(gate_up)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up, where the last dimension holds [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
