"""Attention over the paged KV cache.

One step's tokens arrive flattened: sequence i owns `query_lens[i]` consecutive query tokens, the
last ones of its `context_lens[i]` tokens (cached prefix + new). Keys and values of the new tokens are
first written into the cache at `slot_mapping` (slot = block * block_size + offset; -1 skips a padded
row), then every query attends over its sequence's cache through the block table.

`TorchAttentionBackend` is the reference: plain PyTorch, runs anywhere. Faster backends (Triton) take
the same `AttentionMetadata` and must give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.dtypes import is_fp8, to_cache_dtype


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, -1 padded
    block_size: int
    # Derived index tensors, built once per step by the backend and shared by all layers.
    cache: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class TorchAttentionBackend:
    """Gathers each sequence's keys/values from the cache and runs masked softmax attention.

    Decode rows (one query each) are batched into one padded gather; prefill/extend rows run one
    sequence at a time with a causal mask offset by their cached prefix.
    """

    @staticmethod
    def rotate_and_store_kv(rotary, positions, q, k, v, k_cache, v_cache, slot_mapping):
        """Rotate q and k at `positions`, then write k and v to the cache; returns the rotated (q, k)."""
        q, k = rotary(positions, q, k)
        store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        if "decode_rows" in meta.cache:
            return
        decode_rows = [i for i, q in enumerate(meta.query_lens) if q == 1]
        starts = [0]
        for q in meta.query_lens:
            starts.append(starts[-1] + q)
        meta.cache["starts"] = starts
        meta.cache["decode_rows"] = decode_rows
        meta.cache["extend_rows"] = [i for i, q in enumerate(meta.query_lens) if q > 1]
        bs = meta.block_size
        if decode_rows:
            lens_list = [meta.context_lens[i] for i in decode_rows]
            max_len = max(lens_list)
            num_blocks = -(-max_len // bs)
            # Whole blocks are gathered (one index per block, not per token). A shorter sequence's
            # missing blocks repeat its last block, so every key read is written, finite memory;
            # the mask removes positions past its length. One sequence needs no mask at all.
            rows = []
            for i, n in zip(decode_rows, lens_list):
                table = meta.block_tables[i, : -(-n // bs)]
                rows.append(torch.cat((table, table[-1:].expand(num_blocks - table.shape[0]))))
            meta.cache["decode_blocks"] = torch.stack(rows).long().view(-1)
            meta.cache["decode_len"] = max_len
            if len(decode_rows) > 1:
                lens = torch.tensor(lens_list, device=device)
                pos = torch.arange(num_blocks * bs, device=device)
                meta.cache["decode_mask"] = (pos[None, :] < lens[:, None])[:, None, None, :]
            else:
                meta.cache["decode_mask"] = None
            all_decode = len(decode_rows) == meta.num_seqs
            meta.cache["decode_token_index"] = (
                None if all_decode else torch.tensor([starts[i] for i in decode_rows], device=device)
            )
        extend_slots = {}
        fresh_by_len: dict[int, list[int]] = {}
        for i in meta.cache["extend_rows"]:
            if meta.context_lens[i] == meta.query_lens[i]:
                # A fresh prompt attends to its own new keys, not the cache; equal lengths share a call.
                fresh_by_len.setdefault(meta.query_lens[i], []).append(starts[i])
                continue
            pos = torch.arange(meta.context_lens[i], device=device)
            extend_slots[i] = meta.block_tables[i, pos // bs].long() * bs + pos % bs
        meta.cache["extend_slots"] = extend_slots
        meta.cache["fresh_groups"] = [
            torch.tensor(group_starts, device=device)[:, None] + torch.arange(n, device=device)[None, :]
            for n, group_starts in fresh_by_len.items()
        ]

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; caches: [num_blocks, block_size, Hk, D]. Returns [T, Hq, D].

        `k_new`/`v_new` ([T, Hk, D]) are this step's keys/values: a prompt with no cached prefix
        attends to them directly (plain causal attention, no gather from the cache)."""
        self.prepare(meta, q.device)
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        group = q.shape[1] // num_kv_heads
        out = torch.empty_like(q)
        c = meta.cache
        if c["decode_rows"]:
            idx, mask = c["decode_token_index"], c["decode_mask"]  # mask: [B, 1, 1, L] or None
            b = len(c["decode_rows"])
            k = k_cache.index_select(0, c["decode_blocks"]).view(b, -1, num_kv_heads, head_dim).to(q.dtype)
            v = v_cache.index_select(0, c["decode_blocks"]).view(b, -1, num_kv_heads, head_dim).to(q.dtype)
            if mask is None:  # one sequence: attend to exactly its keys
                k, v = k[:, : c["decode_len"]], v[:, : c["decode_len"]]
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
        if c["fresh_groups"] and k_cache.dtype != q.dtype:
            # Attend to the keys/values as the cache holds them, as if read back from it: a prompt's
            # result must not depend on whether its prefix came from the cache.
            k_new = to_cache_dtype(k_new, k_cache.dtype).to(q.dtype)
            v_new = to_cache_dtype(v_new, v_cache.dtype).to(q.dtype)
        for tokens in c["fresh_groups"]:  # [G, n] token rows of G fresh prompts of length n
            o = F.scaled_dot_product_attention(
                q[tokens].transpose(1, 2),
                k_new[tokens].transpose(1, 2),
                v_new[tokens].transpose(1, 2),
                is_causal=True,
                scale=scale,
                enable_gqa=group > 1,
            )
            out[tokens] = o.transpose(1, 2)
        for i, slots in c["extend_slots"].items():  # prompts extending a cached prefix
            start, end = c["starts"][i], c["starts"][i + 1]
            n, total = end - start, meta.context_lens[i]
            k = k_flat[slots].to(q.dtype).transpose(0, 1)  # [Hk, L, D]
            v = v_flat[slots].to(q.dtype).transpose(0, 1)
            # Query j (absolute position total - n + j) sees keys at positions <= its own.
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=total - n)
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1
            )
            out[start:end] = o.transpose(0, 1)
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
    the cache tensors."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: nn.Module, backend=None
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.rotary = rotary  # `tensorjet.layers.rotary.RotaryEmbedding`, shared by all layers
        self.backend = backend or TorchAttentionBackend()
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k = self.backend.rotate_and_store_kv(
            self.rotary, positions, q, k, v, self.k_cache, self.v_cache, meta.slot_mapping
        )
        return self.backend.forward(q, self.k_cache, self.v_cache, meta, self.scale, k_new=k, v_new=v)
