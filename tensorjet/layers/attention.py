"""Attention over the paged KV cache, and the interface its backends implement.

One step's tokens arrive flattened: sequence i owns `query_lens[i]` consecutive query rows, the last
ones of its `context_lens[i]` tokens (cached prefix + new). A decode has one query row; a prompt chunk,
or a run of draft tokens to verify, has several over whatever the cache already holds. Keys and values
of the new tokens are first written into the cache at `slot_mapping` (slot = block * block_size +
offset; -1 skips a padded row), then every query attends causally over its sequence's cache through
the block table.

A backend (`AttentionBackend`) turns the step's `AttentionMetadata` into its own typed state once per
step (`prepare`); every layer's `forward` reads that state. A backend whose steps CUDA graphs replay
(`GraphAttentionBackend`) also says what a graph captures (`AttentionGraphBuffers`): the parts of the
graph's input buffer it reads for each captured `StepShape` and their values for a step, so the graph
code never sees how a backend lays its state out.

`TorchAttentionBackend` is the reference: plain PyTorch, runs anywhere. The Triton backend
(`tensorjet.layers.triton_attention`) must give the same result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.dtypes import is_fp8, to_cache_dtype
from tensorjet.layers.step_layout import Part
from tensorjet.layers.weight_loader import scalar_weight_loader, set_weight_loader


@dataclass
class AttentionMetadata:
    """One step's attention inputs, built by the runner and shared by every layer."""

    query_lens: list[int]  # per sequence: its query rows this step
    context_lens: list[int]  # per sequence: cached prefix + new tokens
    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot of each new token, -1: write nothing
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, -1 padded
    block_size: int
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
    """A backend's state for CUDA graphs, sized for the largest `StepShape` captured. Its per-step values
    are parts of the graph's one input buffer (written on the host and moved with the step's other
    inputs in one copy); its block tables are static tensors of its own."""

    def parts(self, shape: StepShape) -> list[Part]:
        """The parts a graph of `shape` reads, each at a length fixed by the shape."""
        ...

    def state(self, shape: StepShape, parts: Mapping[str, torch.Tensor]) -> State:
        """The state a graph of `shape` captures over `parts` (views of the input buffer), launch sizes
        fixed."""
        ...

    def host_values(
        self, query_lens: list[int], context_lens: list[int], shape: StepShape
    ) -> tuple[dict[str, list[int]], list[int], int]:
        """A step's values of the parts of `shape`, padded so that what the step leaves empty reads no
        keys; the order in which `load_block_tables` takes the sequences' tables, and how many of them
        (the first) decode."""
        ...

    def load_block_tables(self, tables: torch.Tensor, num_decoding: int) -> None:
        """The step's block tables ([sequences, blocks] on the device, in `host_values`' order) into the
        static ones."""
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


@dataclass(frozen=True)
class CacheRows:
    """`TorchDecodeRows.cache_rows`: what the decode rows read from a cache."""

    keys: torch.Tensor  # [B * Hk * L]
    values: torch.Tensor  # [B * Hq * L]
    value_offsets: torch.Tensor  # [B * Hq] where each query head's bag of L values starts


@dataclass
class TorchDecodeRows:
    """Sequences with one query row, attended together in one padded batch of their keys.

    A layer gathers the keys of each (sequence, key head) from the cache, multiplies the query heads of
    that key head by them in one batched product (GQA without copies of the keys), and sums the values
    straight from the cache weighted by the probabilities (`F.embedding_bag`): only the keys are copied.
    """

    num_seqs: int
    slots: torch.Tensor  # [B, L] each sequence's cache slots, L = the longest context, padded with its last
    mask: torch.Tensor | None  # [B, 1, L] 0 within each context, -inf past it; None for one sequence
    token_rows: torch.Tensor | None  # [B] the rows they own; None: rows 0..B-1
    # (num_kv_heads, group) -> `cache_rows`: the same for every layer, so made by the first
    _rows: dict[tuple[int, int], CacheRows] = field(default_factory=dict)

    def cache_rows(self, num_kv_heads: int, group: int) -> CacheRows:
        """Rows of a cache viewed as [slots * Hk, D]: the keys of each (sequence, key head), [B * Hk * L],
        and the values each query head sums, [B * Hq * L] (those of its key head, in the same order), in
        bags of L from `value_offsets` [B * Hq]."""
        if (num_kv_heads, group) not in self._rows:
            b, length = self.slots.shape
            heads = torch.arange(num_kv_heads, device=self.slots.device)
            rows = self.slots[:, None, :] * num_kv_heads + heads[None, :, None]  # [B, Hk, L]
            value_rows = rows[:, :, None, :].expand(b, num_kv_heads, group, length)
            offsets = torch.arange(0, value_rows.numel(), length, device=self.slots.device)
            self._rows[num_kv_heads, group] = CacheRows(rows.reshape(-1), value_rows.reshape(-1), offsets)
        return self._rows[num_kv_heads, group]


@dataclass
class TorchCachedRows:
    """Sequences with several query rows over a cached prefix (a prompt chunk, drafts to verify), attended
    together: S sequences padded to N query rows and L keys each (a short one repeats its last row and
    its last key, which the mask hides)."""

    num_seqs: int
    max_rows: int  # N
    query_rows: torch.Tensor  # [S * N] the token row each padded query row reads
    slots: torch.Tensor  # [S * L] each sequence's cache slots
    mask: torch.Tensor  # [S, 1, N, L] the keys each query row sees: positions up to its own
    token_rows: torch.Tensor  # [R] every row the sequences own ...
    padded_rows: torch.Tensor  # [R] ... and its place among the S * N padded rows


@dataclass
class TorchAttentionState:
    decode: TorchDecodeRows | None
    # G fresh prompts of length n: their token rows, G * n of them (a slice where they lie one after
    # another, as a step's prompts mostly do: views instead of gathers), G and n
    fresh_groups: list[tuple[torch.Tensor | slice, int, int]]
    cached: TorchCachedRows | None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, probabilities and sums in fp32 at least (fp64 stays fp64)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class TorchAttentionBackend:
    """Gathers keys/values from the cache and runs masked softmax attention, a few calls per layer.

    Sequences with one query row attend in one padded batch (`TorchDecodeRows`); fresh prompts (no
    cached prefix) attend to their own new keys, those of one length in one call; the other sequences
    with several query rows attend in one padded batch (`TorchCachedRows`). Every index and mask is
    built once per step (`prepare`), not per layer. Padding reads only written slots (a cache fresh
    from torch.empty may hold NaN, which a mask would not stop: 0 * NaN is NaN).
    """

    def __init__(self) -> None:
        # The step's slot mapping and whether it skips a row (-1): checked once, not in every layer.
        self._slots_checked: tuple[torch.Tensor, bool] | None = None

    def rotate_and_store_kv(self, rotary, positions, q, k, v, k_cache, v_cache, slot_mapping):
        """Rotate q and k at `positions`, then write k and v to the cache; returns the rotated (q, k)."""
        q, k = rotary(positions, q, k)
        store_kv(k, v, k_cache, v_cache, slot_mapping, self._skips_rows(slot_mapping))
        return q, k

    def _skips_rows(self, slot_mapping: torch.Tensor) -> bool:
        """Whether `slot_mapping` holds a -1, remembered while the same tensor comes back. On a GPU it
        counts as skipping: checking would wait for the device."""
        checked = self._slots_checked
        if checked is None or checked[0] is not slot_mapping:
            skips = slot_mapping.device.type != "cpu" or bool((slot_mapping < 0).any())
            self._slots_checked = checked = (slot_mapping, skips)
        return checked[1]

    def prepare(self, meta: AttentionMetadata) -> TorchAttentionState:
        device = meta.slot_mapping.device
        starts = [0]
        for q in meta.query_lens:
            starts.append(starts[-1] + q)
        decode_rows = [i for i, q in enumerate(meta.query_lens) if q == 1]
        decode = self._decode_rows(meta, decode_rows, starts, device) if decode_rows else None
        cached_seqs: list[int] = []
        fresh_by_len: dict[int, list[int]] = {}
        for i, (n, total) in enumerate(zip(meta.query_lens, meta.context_lens)):
            if n <= 1:
                continue
            if total == n:
                # A fresh prompt attends to its own new keys, not the cache; equal lengths share a call.
                fresh_by_len.setdefault(n, []).append(starts[i])
            else:
                cached_seqs.append(i)
        fresh_groups = [
            (_rows_of(group_starts, n, device), len(group_starts), n)
            for n, group_starts in fresh_by_len.items()
        ]
        cached = self._cached_rows(meta, cached_seqs, starts, device) if cached_seqs else None
        return TorchAttentionState(decode, fresh_groups, cached)

    @staticmethod
    def _decode_rows(
        meta: AttentionMetadata, rows: list[int], starts: list[int], device: torch.device
    ) -> TorchDecodeRows:
        bs = meta.block_size
        lens = torch.tensor([meta.context_lens[i] for i in rows], device=device)
        pos = torch.arange(max(meta.context_lens[i] for i in rows), device=device)
        # Past its own length a shorter sequence reads its last key again, which the mask removes.
        read = torch.minimum(pos[None, :], lens[:, None] - 1)  # [B, L]
        all_decode = len(rows) == meta.num_seqs
        tables = meta.block_tables if all_decode else meta.block_tables[torch.tensor(rows, device=device)]
        slots = tables.long().gather(1, read // bs) * bs + read % bs
        mask = None
        if len(rows) > 1:
            mask = torch.zeros(len(rows), 1, pos.shape[0], device=device)
            mask.masked_fill_((pos[None, :] >= lens[:, None])[:, None, :], float("-inf"))
        token_rows = None if all_decode else torch.tensor([starts[i] for i in rows], device=device)
        return TorchDecodeRows(len(rows), slots, mask, token_rows)

    @staticmethod
    def _cached_rows(
        meta: AttentionMetadata, seqs: list[int], starts: list[int], device: torch.device
    ) -> TorchCachedRows:
        bs = meta.block_size
        query_lens = [meta.query_lens[i] for i in seqs]
        n = max(query_lens)
        seq_index = torch.tensor(seqs, device=device)
        lens = torch.tensor([meta.context_lens[i] for i in seqs], device=device)[:, None]  # [S, 1]
        nums = torch.tensor(query_lens, device=device)[:, None]
        row = torch.arange(n, device=device)[None, :]  # [1, N]
        query_rows = torch.tensor([starts[i] for i in seqs], device=device)[:, None] + row.minimum(nums - 1)
        pos = torch.arange(max(meta.context_lens[i] for i in seqs), device=device)[None, :]  # [1, L]
        read = pos.minimum(lens - 1)
        slots = meta.block_tables[seq_index].long().gather(1, read // bs) * bs + read % bs
        # Query row j of a sequence (a padded one counts as its last) is at position len - num + j.
        query_pos = lens - nums + row.minimum(nums - 1)  # [S, N]
        mask = pos[:, None, :] <= query_pos[:, :, None]  # [S, N, L]
        owned = (row < nums).view(-1)
        padded_rows = torch.arange(len(seqs) * n, device=device)[owned]
        return TorchCachedRows(
            len(seqs), n, query_rows.view(-1), slots.view(-1), mask[:, None], query_rows.view(-1)[owned],
            padded_rows,
        )  # fmt: skip

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
        group = q.shape[1] // k_cache.shape[2]
        d = state.decode
        if d is not None and d.token_rows is None and q.shape[0] == d.num_seqs:
            return self._attend_decode(q, k_cache, v_cache, d, scale)  # every row a decode
        out = torch.empty_like(q)
        if d is not None:
            o = self._attend_decode(q, k_cache, v_cache, d, scale)
            if d.token_rows is None:  # token rows 0..b-1 (callers may pass trailing padded rows)
                out[: d.num_seqs] = o
            else:
                out.index_copy_(0, d.token_rows, o)
        if state.fresh_groups and k_cache.dtype != q.dtype:
            # Attend to the keys/values as the cache holds them, as if read back from it: a prompt's
            # result must not depend on whether its prefix came from the cache.
            k_new = to_cache_dtype(k_new, k_cache.dtype).to(q.dtype)
            v_new = to_cache_dtype(v_new, v_cache.dtype).to(q.dtype)
        for tokens, g, n in state.fresh_groups:  # G fresh prompts of length n
            o = F.scaled_dot_product_attention(
                q[tokens].view(g, n, *q.shape[1:]).transpose(1, 2),
                k_new[tokens].view(g, n, *k_new.shape[1:]).transpose(1, 2),
                v_new[tokens].view(g, n, *v_new.shape[1:]).transpose(1, 2),
                is_causal=True,
                scale=scale,
                enable_gqa=group > 1,
            )
            if isinstance(tokens, slice):
                out[tokens].view(g, n, *q.shape[1:]).copy_(o.transpose(1, 2))
            else:
                out[tokens] = o.transpose(1, 2).reshape(g * n, *q.shape[1:])
        c = state.cached
        if c is not None:
            out.index_copy_(0, c.token_rows, self._attend_cached(q, k_cache, v_cache, c, scale))
        return out

    @staticmethod
    def _attend_decode(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: TorchDecodeRows, scale: float
    ) -> torch.Tensor:
        """The decode rows' attention, [B, Hq, D]."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        b, num_heads = d.num_seqs, q.shape[1]
        group = num_heads // num_kv_heads
        rows = d.cache_rows(num_kv_heads, group)
        dtype = _compute_dtype(q.dtype)
        queries = q[:b] if d.token_rows is None else q.index_select(0, d.token_rows)
        queries = queries.to(dtype).reshape(b * num_kv_heads, group, head_dim)
        keys = k_cache.view(-1, head_dim).index_select(0, rows.keys).to(dtype)
        scores = torch.bmm(queries, keys.view(b * num_kv_heads, -1, head_dim).transpose(1, 2))
        scores = scores.view(b, num_heads, -1).mul_(scale)  # [B, Hq, L]
        if d.mask is not None:
            scores.add_(d.mask)
        probs = scores.softmax(-1)
        values = v_cache.view(-1, head_dim)
        if values.dtype == dtype:  # weighted sums of the cached rows themselves
            out = F.embedding_bag(
                rows.values, values, rows.value_offsets, mode="sum", per_sample_weights=probs.view(-1)
            )
        else:  # a cache in another dtype (FP8, bf16): its values gathered and converted first
            values = values.index_select(0, rows.keys).to(dtype).view(b * num_kv_heads, -1, head_dim)
            out = torch.bmm(probs.view(b * num_kv_heads, group, -1), values)
        return out.view(b, num_heads, head_dim).to(q.dtype)

    @staticmethod
    def _attend_cached(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, c: TorchCachedRows, scale: float
    ) -> torch.Tensor:
        """The rows of the sequences with a cached prefix, in `c.token_rows` order, [R, Hq, D]."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        s, n, num_heads = c.num_seqs, c.max_rows, q.shape[1]
        k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, c.slots).to(q.dtype)
        v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, c.slots).to(q.dtype)
        o = F.scaled_dot_product_attention(
            q.index_select(0, c.query_rows).view(s, n, num_heads, head_dim).transpose(1, 2),
            k.view(s, -1, num_kv_heads, head_dim).transpose(1, 2),  # [S, Hk, L, D]
            v.view(s, -1, num_kv_heads, head_dim).transpose(1, 2),
            attn_mask=c.mask,
            scale=scale,
            enable_gqa=num_heads > num_kv_heads,
        )  # [S, Hq, N, D]
        return o.transpose(1, 2).reshape(s * n, num_heads, head_dim).index_select(0, c.padded_rows)


def _rows_of(starts: list[int], n: int, device: torch.device) -> torch.Tensor | slice:
    """The n rows from each of `starts`, in order: a slice where each start follows the previous one's
    rows, else their indices."""
    if starts == list(range(starts[0], starts[0] + len(starts) * n, n)):
        return slice(starts[0], starts[0] + len(starts) * n)
    return (torch.tensor(starts, device=device)[:, None] + torch.arange(n, device=device)).view(-1)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    skips_rows: bool = True,
) -> None:
    """Write new keys/values into their cache slots; slot -1 marks a padded row and is skipped.

    Only CUDA-graph batches are padded, and those store through the Triton kernel; a caller that
    knows `slot_mapping` holds no -1 (`skips_rows=False`) gets one copy per cache, else the valid rows
    are picked first."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k, v = to_cache_dtype(k, k_cache.dtype), to_cache_dtype(v, v_cache.dtype)
    if is_fp8(k_cache.dtype):  # index_copy_ has no FP8 kernel on CPU: move the bytes
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    if not skips_rows:
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
