"""Small numeric helpers shared by the kernel tests."""

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
