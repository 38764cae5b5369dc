"""Batch-invariant products and attention: each row's result is independent of the rest of the step.

A GEMM library picks its algorithm, blocking and reduction split by the shape of the call, so the same
row multiplied inside a batch of 1, 24 or 200 rounds differently in the last bits, and a greedy near-tie
can flip with the batch. In batch-invariant mode every product runs as calls of one fixed shape (the
rows cut into tiles of `row_tile` rows, the last one zero-padded): a row's output then depends only on
the row, whatever the batch, the chunking or the step it lands in. Attention computes each query row on
its own over exactly the keys at positions up to its own, in the same order whether the row is a
decode, one of a prompt chunk or a recomputation after preemption.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tensorjet.layers.attention import AttentionMetadata, TorchAttentionBackend

# (x [M, K], weight [N, K], the weight format's further operands: bias, scales) -> [M, N]
Product = Callable[..., torch.Tensor]

# Rows per product call. The CPU (fp32, oneDNN/MKL) is bound by reading weights below ~16 rows, so a
# 16-row tile costs a one-row decode little; on the GPU a 128-row bf16 GEMM still costs about what
# reading its weights does.
CPU_ROW_TILE = 16
CUDA_ROW_TILE = 128


def row_tile_for(device: torch.device) -> int:
    return CUDA_ROW_TILE if device.type == "cuda" else CPU_ROW_TILE


def row_tiled(product: Product, row_tile: int) -> Product:
    """`product` applied to fixed-shape tiles of `row_tile` rows (the last tile zero-padded)."""

    def tiled(x: torch.Tensor, *operands: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        if rows == row_tile:
            return product(x, *operands)
        pad = -rows % row_tile
        if pad:
            x = torch.cat((x, x.new_zeros(pad, *x.shape[1:])))
        out = torch.cat([product(tile, *operands) for tile in x.split(row_tile)])
        return out[:rows]

    return tiled


def attend_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention, one query row at a time over exactly its visible keys.

    q: [T, Hq, D], sequence i owning the next `query_lens[i]` rows, the last of its `context_lens[i]`
    positions; caches: [num_blocks, block_size, Hk, D]. A row at position p runs the same three calls
    (scores [Hk, group, p + 1], their softmax, the weighted sum of values) of the same shapes and
    strides wherever it comes from."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    queries = q.reshape(q.shape[0], num_kv_heads, -1, head_dim)  # [T, Hk, group, D]
    out = torch.empty_like(q)
    rows = out.view(queries.shape)
    row = 0
    for seq, (num_queries, num_keys) in enumerate(zip(query_lens, context_lens)):
        pos = torch.arange(num_keys, device=q.device)
        slots = block_tables[seq, pos // block_size].long() * block_size + pos % block_size
        keys_t = k_flat[slots].to(q.dtype).permute(1, 2, 0)  # [Hk, D, L]
        values = v_flat[slots].to(q.dtype).transpose(0, 1)  # [Hk, L, D]
        first = num_keys - num_queries
        for j in range(num_queries):
            visible = first + j + 1
            scores = torch.matmul(queries[row + j], keys_t[:, :, :visible]).mul_(scale)
            torch.matmul(scores.softmax(-1), values[:, :visible], out=rows[row + j])
        row += num_queries
    return out


@dataclass
class RowwiseAttentionState:
    block_tables: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]


class RowwiseAttentionBackend(TorchAttentionBackend):
    """The reference backend in batch-invariant mode: every query row attends on its own (`attend_rows`)."""

    def prepare(self, meta: AttentionMetadata) -> RowwiseAttentionState:
        return RowwiseAttentionState(meta.block_tables, list(meta.query_lens), list(meta.context_lens))

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        state: RowwiseAttentionState,
        scale: float,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return attend_rows(
            q, k_cache, v_cache, state.block_tables, state.query_lens, state.context_lens, scale
        )
