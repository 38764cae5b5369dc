"""`TritonAttentionBackend`: the Triton kernels behind `TorchAttentionBackend`'s interface.

Per step, `prepare` splits the batch into decode rows (query_len == 1) and extend rows (the rest) and
builds every int32 index tensor they need with one host-to-device copy, cached in `meta.cache` and
shared by all layers. `forward` then runs split-KV flash-decoding on the decode rows and the
extend kernel on the others, each writing its own rows of one output tensor; a batch of one kind
launches only that kind's kernels and needs no gather at all.
"""

from __future__ import annotations

import torch

from tensorjet.kernels.decode_attention import choose_num_splits, decode_attention
from tensorjet.kernels.extend_attention import extend_attention
from tensorjet.kernels.rotary import rotary_and_store_kv
from tensorjet.layers.attention import AttentionMetadata

_KEY = "triton"


class TritonAttentionBackend:
    """Paged attention with Triton kernels; same results as `TorchAttentionBackend`.

    num_splits: fixed number of KV splits for decode rows (e.g. to keep shapes fixed for CUDA-graph
    capture); None chooses per step from the batch (`choose_num_splits`).
    """

    def __init__(self, num_splits: int | None = None) -> None:
        self.num_splits = num_splits
        # Batch-invariant mode: decode rows run through the extend kernel too, and both visit keys in
        # fixed tiles, so a row's result is the same as a decode, in a prompt chunk or recomputed.
        self.batch_invariant = False

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        if _KEY in meta.cache:
            return
        device = torch.device(device)
        qlens, clens = list(meta.query_lens), list(meta.context_lens)
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        decode_rows = [i for i, n in enumerate(qlens) if n == 1]
        extend_rows = [i for i, n in enumerate(qlens) if n > 1]
        num_seqs = len(qlens)

        # One int32 buffer, one copy: [all context lens | decode: seq ids, token rows | extend: seq ids,
        # query starts, query lens].
        host = list(clens)
        offsets = {}
        for name, values in (
            ("dec_seq", decode_rows),
            ("dec_row", [starts[i] for i in decode_rows]),
            ("ext_seq", extend_rows),
            ("ext_start", [starts[i] for i in extend_rows]),
            ("ext_qlen", [qlens[i] for i in extend_rows]),
        ):
            # Each part starts 16-byte aligned: Triton specialises on pointer alignment, so a part at
            # an odd offset would compile another kernel variant.
            host += [0] * (-len(host) % 4)
            offsets[name] = (len(host), len(host) + len(values))
            host += values
        # Pinned: a copy from pageable memory would wait for every kernel queued before it.
        pinned = torch.tensor(host, dtype=torch.int32, pin_memory=device.type == "cuda")
        buf = pinned.to(device, non_blocking=True)

        def part(name: str) -> torch.Tensor:
            return buf[offsets[name][0] : offsets[name][1]]

        all_ctx = buf[:num_seqs]
        tables = meta.block_tables.to(device=device, dtype=torch.int32)

        state: dict = {"decode": None, "extend": None}
        if decode_rows:
            pure = len(decode_rows) == num_seqs  # every row decodes: token row i is sequence i
            max_ctx = max(clens[i] for i in decode_rows)
            state["decode"] = {
                "block_tables": tables if pure else tables[part("dec_seq").long()],
                "context_lens": all_ctx if pure else all_ctx[part("dec_seq").long()],
                "rows": None if pure else part("dec_row"),
                "max_context_len": max_ctx,
            }
        if extend_rows:
            pure = len(extend_rows) == num_seqs
            state["extend"] = {
                "block_tables": tables if pure else tables[part("ext_seq").long()],
                "context_lens": all_ctx if pure else all_ctx[part("ext_seq").long()],
                "query_start_loc": part("ext_start"),
                "query_lens": part("ext_qlen"),
                "max_query_len": max(qlens[i] for i in extend_rows),
            }
        meta.cache[_KEY] = state

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

        `k_new`/`v_new` (this step's keys/values) are accepted for interface parity with
        `TorchAttentionBackend` and not needed: they are already in the cache, which the kernels read."""
        self.prepare(meta, q.device)
        state = meta.cache[_KEY]
        # A padded graph step has rows no sequence owns; zeroed, they carry no stale memory onward.
        out = torch.zeros_like(q) if state.get("padded") else torch.empty_like(q)
        d = state["decode"]
        if d is not None and self.batch_invariant:
            num_rows = d["context_lens"].shape[0]
            rows = d["rows"]
            if rows is None:
                rows = torch.arange(num_rows, dtype=torch.int32, device=q.device)
            ones = torch.ones(num_rows, dtype=torch.int32, device=q.device)
            extend_attention(
                q, k_cache, v_cache, d["block_tables"], rows, ones, d["context_lens"], scale, out,
                max_query_len=1, fixed_key_tiles=True,
            )  # fmt: skip
        elif d is not None:
            num_splits = d.get("num_splits", self.num_splits)  # fixed by a CUDA-graph bucket
            if num_splits is None:
                num_splits = choose_num_splits(
                    d["context_lens"].shape[0], k_cache.shape[2], d["max_context_len"], q.device
                )
            decode_attention(
                q,
                k_cache,
                v_cache,
                d["block_tables"],
                d["context_lens"],
                scale,
                out,
                num_splits=num_splits,
                rows=d["rows"],
            )
        e = state["extend"]
        if e is not None:
            extend_attention(
                q,
                k_cache,
                v_cache,
                e["block_tables"],
                e["query_start_loc"],
                e["query_lens"],
                e["context_lens"],
                scale,
                out,
                max_query_len=e["max_query_len"],
                fixed_key_tiles=self.batch_invariant,
            )
        return out

    @staticmethod
    def rotate_and_store_kv(rotary, positions, q, k, v, k_cache, v_cache, slot_mapping):
        """Rotate q and k in place and write k and v to the cache in one launch (`rotary_and_store_kv`,
        the numerics of `RotaryEmbedding` and `store_kv`); slot -1 skips a padded row."""
        rotary_and_store_kv(positions, q, k, v, rotary.cos, rotary.sin, k_cache, v_cache, slot_mapping)
        return q, k
