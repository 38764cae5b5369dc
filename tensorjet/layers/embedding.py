"""The token embedding, split over tensor-parallel ranks by vocabulary.

Each rank holds ceil(vocab / ranks) rows (the last zero-padded where the ranks do not divide the
vocabulary); a token outside a rank's rows reads zeros there, and one all-reduce sums the ranks' lookups
into every token's row. A tied LM head multiplies by the same rows (`TiedLinearMethod`), so it computes
the rank's slice of the logits. With one rank it is a plain lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.distributed import SINGLE, TensorParallel, split
from tensorjet.layers.weight_loader import copy_checked, set_weight_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.rows = split(num_embeddings, tp, "vocabulary", pad=True)
        self.weight = nn.Parameter(
            torch.empty(self.rows.size, embedding_dim, dtype=dtype), requires_grad=False
        )
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        """The checkpoint's [vocab, dim] embedding: this rank's rows, zeros past the vocabulary."""
        if shard_id is not None:
            raise ValueError(f"is shard {shard_id} of a parameter that has no shards")
        if tensor.dim() != 2 or tensor.shape[0] != self.num_embeddings:
            raise ValueError(
                f"has shape {tuple(tensor.shape)}, expected ({self.num_embeddings}, {param.shape[1]})"
            )
        rows = self.rows
        if rows.size == self.num_embeddings and _fits_as_is(param, tensor):
            # All of it, as the checkpoint holds it: taken as it is (memory-mapped where it was read so,
            # rows read as they are looked up) rather than copied; nothing writes to it.
            param.data = tensor
            return
        copy_checked(param.data[: rows.valid], tensor[rows.start : rows.start + rows.valid])
        param.data[rows.valid :].zero_()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.rows.start
        outside = (local < 0) | (local >= self.rows.valid)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))


def _fits_as_is(param: torch.Tensor, tensor: torch.Tensor) -> bool:
    same = tensor.shape == param.shape and tensor.dtype == param.dtype and tensor.device == param.device
    return same and tensor.is_contiguous()
