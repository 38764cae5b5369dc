"""Per-parameter checkpoint loaders.

A parameter may carry `weight_loader(param, tensor, shard_id)`, set by whatever created it (a
`LinearMethod` for a linear layer's weights): it knows the parameter's layout, so it decides where a
checkpoint tensor goes, e.g. the rows of one shard of a merged q|k|v weight. Parameters without
one (norms) take the checkpoint tensor whole (`default_weight_loader`). A loader is where a
tensor-parallel layer takes its rank's slice of the checkpoint tensor (`Linear.narrow_to_rank`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (the parameter, the checkpoint tensor, which shard of a merged parameter it is, or None). A tensor
# that does not fit raises ValueError with a message that goes on from "checkpoint tensor NAME ...".
WeightLoader = Callable[[nn.Parameter, torch.Tensor, int | None], None]


def copy_checked(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy `tensor` into `target`; a ValueError names both shapes where they differ."""
    if target.shape != tensor.shape:
        raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    target.copy_(tensor)


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None = None) -> None:
    if shard_id is not None:
        raise ValueError(f"is shard {shard_id} of a parameter that has no shards")
    copy_checked(param.data, tensor)


def scalar_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None = None) -> None:
    """A per-tensor scale: one value, whatever shape the checkpoint gives it ([], [1])."""
    if tensor.numel() != 1 or shard_id is not None:
        raise ValueError(f"has shape {tuple(tensor.shape)}: a per-tensor scale is one value")
    param.data.copy_(tensor.reshape(param.shape))


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    param.weight_loader = loader


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    return getattr(param, "weight_loader", default_weight_loader)
