"""Attention over the paged KV cache, and the interface its backends implement.

One step's tokens arrive flattened: sequence i owns `query_lens[i]` consecutive query rows, the last
ones of its `context_lens[i]` tokens (cached prefix + new). A decode has one query row; a prompt chunk,
or a run of draft tokens to verify, has several over whatever the cache already holds. Keys and values
of the new tokens are first written into the cache at `slot_mapping` (slot = block * block_size +
offset; -1 skips a padded row), then every query attends causally over its sequence's cache through
the block table.

A backend (`AttentionBackend`) turns the step's `AttentionMetadata` into its own typed state once per
step (`prepare`); every layer's `forward` reads that state. A backend whose steps CUDA graphs replay
(`GraphAttentionBackend`) also owns the static buffers a graph captures (`AttentionGraphBuffers`): the
state for each captured `StepShape`, and `fill`, which puts a step's state there, so the graph code
never sees how a backend lays its state out.

`TorchAttentionBackend` is the reference: plain PyTorch, runs anywhere. The Triton backend
(`tensorjet.layers.triton_attention`) must give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.dtypes import is_fp8, to_cache_dtype
from tensorjet.layers.weight_loader import scalar_weight_loader, set_weight_loader


@dataclass
class AttentionMetadata:
    """One step's attention inputs, built by the runner and shared by every layer."""

    query_lens: list[int]  # per sequence: its query rows this step
    context_lens: list[int]  # per sequence: cached prefix + new tokens
    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot of each new token, -1: write nothing
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, -1 padded
    block_size: int
    # context_lens on the device (the runner's copy; a decode-only CUDA graph takes it from here).
    context_lens_tensor: torch.Tensor | None = None
    # The backend's `prepare(self)`: made by the first layer that runs, read by all (a CUDA graph sets
    # its static state here instead).
    state: object | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass(frozen=True)
class StepShape:
    """What a step replayed from a CUDA graph may hold; every launch size in the graph follows from it.

    At most `num_seqs` sequences, at most `num_multi_row_seqs` of them with more than one query row and
    none with more than `max_query_len`, in `num_rows` token rows. Unless every sequence has one row
    (`num_multi_row_seqs == 0`), a step leaves at least the last row to padding: padded sequences write
    their unused output there.
    """

    num_rows: int
    num_seqs: int
    num_multi_row_seqs: int
    max_query_len: int


State = TypeVar("State")


class AttentionBackend(Protocol[State]):
    """How attention runs: `prepare` once per step, `rotate_and_store_kv` and `forward` per layer."""

    def prepare(self, meta: AttentionMetadata) -> State:
        """The step's index tensors and row routing, shared by every layer."""
        ...

    def rotate_and_store_kv(
        self,
        rotary: nn.Module,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k at `positions`, write k and v to their cache slots; returns the rotated (q, k)."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        state: State,
        scale: float,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; caches: [num_blocks, block_size, Hk, D]; k_new/v_new: this step's [T, Hk, D]
        keys/values (already in the cache). Returns [T, Hq, D]."""
        ...


class AttentionGraphBuffers(Protocol[State]):
    """A backend's static state for CUDA graphs, sized for the largest `StepShape` captured."""

    def state(self, shape: StepShape) -> State:
        """The state a graph of `shape` captures: views of the static buffers, launch sizes fixed."""
        ...

    def fill(self, meta: AttentionMetadata, shape: StepShape) -> None:
        """Copy a step's state into the buffers of `shape`; what the step leaves empty is padding that
        reads no keys."""
        ...


@runtime_checkable
class GraphAttentionBackend(AttentionBackend[State], Protocol[State]):
    """A backend whose steps can be captured in CUDA graphs."""

    def graph_buffers(
        self,
        capacity: StepShape,
        *,
        max_context_len: int,
        block_size: int,
        num_kv_heads: int,
        device: torch.device,
    ) -> AttentionGraphBuffers[State]: ...


@dataclass
class TorchDecodeRows:
    """Sequences with one query row, attended in one padded batch."""

    num_seqs: int
    slots: torch.Tensor  # [B * L] each sequence's cache slots, L = its longest context, padded with its last
    mask: torch.Tensor | None  # [B, 1, 1, L] positions within each context; None for one sequence
    token_rows: torch.Tensor | None  # [B] the rows they own; None: rows 0..B-1


@dataclass
class TorchCachedRows:
    """One sequence with several query rows over a cached prefix: rows start:end, the last of its
    context_len tokens, whose keys and values are at `slots`."""

    start: int
    end: int
    context_len: int
    slots: torch.Tensor


@dataclass
class TorchAttentionState:
    decode: TorchDecodeRows | None
    fresh_groups: list[torch.Tensor]  # [G, n] token rows of G fresh prompts of length n
    cached: list[TorchCachedRows]


class TorchAttentionBackend:
    """Gathers each sequence's keys/values from the cache and runs masked softmax attention.

    Sequences with one query row are batched into one padded gather; fresh prompts (no cached prefix)
    attend to their own new keys, those of one length in one call; any other sequence with several
    query rows runs alone, with a causal mask offset by its cached prefix.
    """

    @staticmethod
    def rotate_and_store_kv(rotary, positions, q, k, v, k_cache, v_cache, slot_mapping):
        """Rotate q and k at `positions`, then write k and v to the cache; returns the rotated (q, k)."""
        q, k = rotary(positions, q, k)
        store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k

    def prepare(self, meta: AttentionMetadata) -> TorchAttentionState:
        device = meta.slot_mapping.device
        starts = [0]
        for q in meta.query_lens:
            starts.append(starts[-1] + q)
        decode_rows = [i for i, q in enumerate(meta.query_lens) if q == 1]
        decode = self._decode_rows(meta, decode_rows, starts, device) if decode_rows else None
        cached: list[TorchCachedRows] = []
        fresh_by_len: dict[int, list[int]] = {}
        bs = meta.block_size
        for i, (n, total) in enumerate(zip(meta.query_lens, meta.context_lens)):
            if n <= 1:
                continue
            if total == n:
                # A fresh prompt attends to its own new keys, not the cache; equal lengths share a call.
                fresh_by_len.setdefault(n, []).append(starts[i])
                continue
            pos = torch.arange(total, device=device)
            slots = meta.block_tables[i, pos // bs].long() * bs + pos % bs
            cached.append(TorchCachedRows(starts[i], starts[i + 1], total, slots))
        fresh_groups = [
            torch.tensor(group_starts, device=device)[:, None] + torch.arange(n, device=device)[None, :]
            for n, group_starts in fresh_by_len.items()
        ]
        return TorchAttentionState(decode, fresh_groups, cached)

    @staticmethod
    def _decode_rows(
        meta: AttentionMetadata, rows: list[int], starts: list[int], device: torch.device
    ) -> TorchDecodeRows:
        bs = meta.block_size
        lens = torch.tensor([meta.context_lens[i] for i in rows], device=device)
        pos = torch.arange(max(meta.context_lens[i] for i in rows), device=device)
        # Past its own length a shorter sequence reads its last key again: every slot read was written
        # (a cache fresh from torch.empty may hold NaN, which a mask would not stop: 0 * NaN is NaN),
        # and the mask removes those positions. One sequence needs no mask at all.
        read = torch.minimum(pos[None, :], lens[:, None] - 1)  # [B, L]
        tables = meta.block_tables[torch.tensor(rows, device=device)].long()
        slots = tables.gather(1, read // bs) * bs + read % bs
        mask = (pos[None, :] < lens[:, None])[:, None, None, :] if len(rows) > 1 else None
        all_decode = len(rows) == meta.num_seqs
        token_rows = None if all_decode else torch.tensor([starts[i] for i in rows], device=device)
        return TorchDecodeRows(len(rows), slots.view(-1), mask, token_rows)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        state: TorchAttentionState,
        scale: float,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; caches: [num_blocks, block_size, Hk, D]. Returns [T, Hq, D].

        `k_new`/`v_new` ([T, Hk, D]) are this step's keys/values: a prompt with no cached prefix
        attends to them directly (plain causal attention, no gather from the cache)."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        group = q.shape[1] // num_kv_heads
        out = torch.empty_like(q)
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        d = state.decode
        if d is not None:
            idx, mask = d.token_rows, d.mask
            b = d.num_seqs
            k = k_flat.index_select(0, d.slots).view(b, -1, num_kv_heads, head_dim).to(q.dtype)
            v = v_flat.index_select(0, d.slots).view(b, -1, num_kv_heads, head_dim).to(q.dtype)
            o = F.scaled_dot_product_attention(
                (q[:b] if idx is None else q[idx])[:, :, None],
                k.transpose(1, 2),  # [B, Hk, L, D]
                v.transpose(1, 2),
                attn_mask=mask,
                scale=scale,
                enable_gqa=group > 1,
            )
            if idx is None and q.shape[0] == b:
                out = o[:, :, 0]
            elif idx is None:  # token rows 0..b-1 (callers may pass trailing padded rows)
                out[:b] = o[:, :, 0]
            else:
                out[idx] = o[:, :, 0]
        if state.fresh_groups and k_cache.dtype != q.dtype:
            # Attend to the keys/values as the cache holds them, as if read back from it: a prompt's
            # result must not depend on whether its prefix came from the cache.
            k_new = to_cache_dtype(k_new, k_cache.dtype).to(q.dtype)
            v_new = to_cache_dtype(v_new, v_cache.dtype).to(q.dtype)
        for tokens in state.fresh_groups:  # [G, n] token rows of G fresh prompts of length n
            o = F.scaled_dot_product_attention(
                q[tokens].transpose(1, 2),
                k_new[tokens].transpose(1, 2),
                v_new[tokens].transpose(1, 2),
                is_causal=True,
                scale=scale,
                enable_gqa=group > 1,
            )
            out[tokens] = o.transpose(1, 2)
        for rows in state.cached:  # query rows over a cached prefix
            n, total = rows.end - rows.start, rows.context_len
            k = k_flat[rows.slots].to(q.dtype).transpose(0, 1)  # [Hk, L, D]
            v = v_flat[rows.slots].to(q.dtype).transpose(0, 1)
            # Query j (absolute position total - n + j) sees keys at positions <= its own.
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=total - n)
            o = F.scaled_dot_product_attention(
                q[rows.start : rows.end].transpose(0, 1),
                k,
                v,
                attn_mask=mask,
                scale=scale,
                enable_gqa=group > 1,
            )
            out[rows.start : rows.end] = o.transpose(0, 1)
        return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new keys/values into their cache slots; slot -1 marks a padded row and is skipped.

    Only CUDA-graph batches are padded, and those store through the Triton kernel; here a CPU tensor
    is checked for -1 (cheap) and a GPU one is masked (checking would wait for the device)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k, v = to_cache_dtype(k, k_cache.dtype), to_cache_dtype(v, v_cache.dtype)
    if is_fp8(k_cache.dtype):  # index_copy_ has no FP8 kernel on CPU: move the bytes
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    if slot_mapping.device.type == "cpu" and not bool((slot_mapping < 0).any()):
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
        return
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[valid]
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[valid]


class Attention(nn.Module):
    """Rotates this layer's new q/k, stores the new K/V and attends over the cache. The runner binds
    the cache tensors and may swap the backend (all layers share one)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: nn.Module,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.rotary = rotary  # `tensorjet.layers.rotary.RotaryEmbedding`, shared by all layers
        self.backend: AttentionBackend = backend or TorchAttentionBackend()
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # An FP8 cache stores k / k_scale and v / v_scale (per-tensor, calibrated by the checkpoint;
        # 1.0 without one). Attention over the stored values multiplies the scores by k_scale and the
        # output by v_scale. Set once at start-up (`use_kv_scales`), so graphs capture plain numbers.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def add_kv_scale_parameters(self) -> None:
        """Parameters for a checkpoint's `k_scale`/`v_scale`, applied by `use_kv_scales` once loaded."""
        self.k_scale_param = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
        self.v_scale_param = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
        set_weight_loader(self.k_scale_param, scalar_weight_loader)
        set_weight_loader(self.v_scale_param, scalar_weight_loader)

    def use_kv_scales(self, k_scale: float, v_scale: float) -> None:
        if not (k_scale > 0 and v_scale > 0):
            raise ValueError(f"KV-cache scales must be positive, got k_scale={k_scale}, v_scale={v_scale}")
        self.k_scale, self.v_scale = k_scale, v_scale

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if meta.state is None:  # the step's first layer prepares what every layer reads
            meta.state = self.backend.prepare(meta)
        scaled = self.k_scale != 1.0 or self.v_scale != 1.0
        if scaled:  # rotation is linear: rotating k / k_scale stores the rotated k / k_scale
            k, v = k * (1.0 / self.k_scale), v * (1.0 / self.v_scale)
        q, k = self.backend.rotate_and_store_kv(
            self.rotary, positions, q, k, v, self.k_cache, self.v_cache, meta.slot_mapping
        )
        out = self.backend.forward(
            q, self.k_cache, self.v_cache, meta.state, self.scale * self.k_scale, k_new=k, v_new=v
        )
        return out * self.v_scale if scaled else out
