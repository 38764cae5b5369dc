"""`TritonAttentionBackend`: the Triton kernels behind the `AttentionBackend` interface.

Per step, `prepare` routes each sequence by its query rows: up to `MAX_DECODE_QUERY_ROWS` (one, or
drafts to verify) go to split-KV flash-decoding (`decode_attention`), which reads a sequence's keys once
for all its rows and splits long contexts across the GPU; more (a prompt chunk) to the extend kernel,
which attends them causally over the cached prefix plus themselves (`extend_attention`). It builds every
int32 index tensor they need with one host-to-device copy. `forward` then runs each kind's kernel on its
rows of one output tensor; a batch of one kind launches only that kind's kernels and needs no gather.

For CUDA graphs, `graph_buffers` holds the same state in static tensors (`TritonGraphBuffers`): a shape
whose sequences all have one row keeps the plain decode layout (sequence i is token row i); a shape of
at most MAX_DECODE_QUERY_ROWS rows per sequence (a verify step) runs every sequence as a decode with its
own first row and row count; any other shape sends its multi-row sequences to the extend kernel. The
last two send padded sequences to the shape's last row and zero the output rows that no sequence owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tensorjet.kernels.decode_attention import choose_num_splits, decode_attention
from tensorjet.kernels.extend_attention import extend_attention
from tensorjet.kernels.rotary import rotary_and_store_kv
from tensorjet.layers.attention import AttentionMetadata, StepShape
from tensorjet.layers.step_layout import Part

# Sequences with up to this many query rows (a decode, or drafts to verify) run the decode kernel.
MAX_DECODE_QUERY_ROWS = 8


@dataclass
class DecodeRows:
    """Sequences with one query row, or a few (`query_lens`)."""

    block_tables: torch.Tensor  # [n, max_blocks] int32
    context_lens: torch.Tensor  # [n] int32
    rows: torch.Tensor | None  # [n] int32 (first) token row of each; None: sequence i is row i
    max_context_len: int
    num_splits: int | None = None  # fixed by a CUDA graph's shape; None: chosen per step
    query_lens: torch.Tensor | None = None  # [n] int32 query rows of each; None: one each
    max_query_len: int = 1


@dataclass
class ExtendRows:
    """Sequences with several query rows over their cached context."""

    block_tables: torch.Tensor  # [n, max_blocks] int32
    context_lens: torch.Tensor  # [n] int32, cached prefix + new rows
    query_start_loc: torch.Tensor  # [n] int32 first token row of each
    query_lens: torch.Tensor  # [n] int32
    max_query_len: int  # sizes the kernel's grid


@dataclass
class TritonAttentionState:
    decode: DecodeRows | None
    extend: ExtendRows | None
    zero_padding: bool = False  # a padded graph step: rows no sequence owns are zeroed


class TritonAttentionBackend:
    """Paged attention with Triton kernels; same results as `TorchAttentionBackend`.

    batch_invariant: single-row sequences run through the extend kernel too, and every row visits its
    keys in tiles at fixed positions, so a row's result is the same as a decode, in a prompt chunk or
    recomputed after preemption, whatever else the step holds."""

    def __init__(self, batch_invariant: bool = False) -> None:
        self.batch_invariant = batch_invariant
        self._row_ids = torch.empty(0, dtype=torch.int32)  # 0, 1, ...: single-row sequences' rows
        self._ones = torch.empty(0, dtype=torch.int32)  # their query lengths

    def _single_rows(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids 0..n-1 and n ones, shared by every layer and step. Made at the first step with single-row
        sequences; with CUDA graphs that is the largest decode graph's warm-up (no step holds more), so
        the buffers a graph captured are never replaced."""
        if self._ones.shape[0] < n or self._ones.device != device:
            self._row_ids = torch.arange(n, dtype=torch.int32, device=device)
            self._ones = torch.ones(n, dtype=torch.int32, device=device)
        return self._row_ids[:n], self._ones[:n]

    def prepare(
        self, meta: AttentionMetadata, max_decode_rows: int = MAX_DECODE_QUERY_ROWS
    ) -> TritonAttentionState:
        """max_decode_rows: the most query rows a sequence run as a decode may have (a CUDA graph's
        shape fixes which kernel its sequences take; batch-invariant mode decodes single rows only)."""
        device = meta.slot_mapping.device
        qlens, clens = list(meta.query_lens), list(meta.context_lens)
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        if self.batch_invariant:
            max_decode_rows = 1
        decode_seqs = [i for i, n in enumerate(qlens) if n <= max_decode_rows]
        extend_seqs = [i for i, n in enumerate(qlens) if n > max_decode_rows]
        num_seqs = len(qlens)
        max_decode_query = max((qlens[i] for i in decode_seqs), default=1)

        # One int32 buffer, one copy: [all context lens | decode: seq ids, token rows, query lens |
        # extend: seq ids, query starts, query lens].
        host = list(clens)
        offsets = {}
        for name, values in (
            ("dec_seq", decode_seqs),
            ("dec_row", [starts[i] for i in decode_seqs]),
            ("dec_qlen", [qlens[i] for i in decode_seqs] if max_decode_query > 1 else []),
            ("ext_seq", extend_seqs),
            ("ext_start", [starts[i] for i in extend_seqs]),
            ("ext_qlen", [qlens[i] for i in extend_seqs]),
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

        decode = extend = None
        if decode_seqs:
            every = len(decode_seqs) == num_seqs
            pure = every and max_decode_query == 1  # token row i is sequence i
            decode = DecodeRows(
                block_tables=tables if every else tables[part("dec_seq").long()],
                context_lens=all_ctx if every else all_ctx[part("dec_seq").long()],
                rows=None if pure else part("dec_row"),
                max_context_len=max(clens[i] for i in decode_seqs),
                query_lens=part("dec_qlen") if max_decode_query > 1 else None,
                max_query_len=max_decode_query,
            )
        if extend_seqs:
            pure = len(extend_seqs) == num_seqs
            extend = ExtendRows(
                block_tables=tables if pure else tables[part("ext_seq").long()],
                context_lens=all_ctx if pure else all_ctx[part("ext_seq").long()],
                query_start_loc=part("ext_start"),
                query_lens=part("ext_qlen"),
                max_query_len=max(qlens[i] for i in extend_seqs),
            )
        return TritonAttentionState(decode, extend)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        state: TritonAttentionState,
        scale: float,
        k_new: torch.Tensor | None = None,
        v_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; caches: [num_blocks, block_size, Hk, D]. Returns [T, Hq, D].

        `k_new`/`v_new` (this step's keys/values) are accepted for interface parity with
        `TorchAttentionBackend` and not needed: they are already in the cache, which the kernels read."""
        # A padded graph step has rows no sequence owns; zeroed, they carry no stale memory onward.
        out = torch.zeros_like(q) if state.zero_padding else torch.empty_like(q)
        d = state.decode
        if d is not None and self.batch_invariant:
            row_ids, ones = self._single_rows(d.context_lens.shape[0], q.device)
            rows = row_ids if d.rows is None else d.rows
            extend_attention(
                q, k_cache, v_cache, d.block_tables, rows, ones, d.context_lens, scale, out,
                max_query_len=1, fixed_key_tiles=True,
            )  # fmt: skip
        elif d is not None:
            num_splits = d.num_splits
            if num_splits is None:
                num_splits = choose_num_splits(
                    d.context_lens.shape[0], k_cache.shape[2], d.max_context_len, q.device
                )
            decode_attention(
                q,
                k_cache,
                v_cache,
                d.block_tables,
                d.context_lens,
                scale,
                out,
                num_splits=num_splits,
                rows=d.rows,
                query_lens=d.query_lens,
                max_query_len=d.max_query_len,
            )
        e = state.extend
        if e is not None:
            extend_attention(
                q,
                k_cache,
                v_cache,
                e.block_tables,
                e.query_start_loc,
                e.query_lens,
                e.context_lens,
                scale,
                out,
                max_query_len=e.max_query_len,
                fixed_key_tiles=self.batch_invariant,
            )
        return out

    @staticmethod
    def rotate_and_store_kv(rotary, positions, q, k, v, k_cache, v_cache, slot_mapping):
        """Rotate q and k in place and write k and v to the cache in one launch (`rotary_and_store_kv`,
        the numerics of `RotaryEmbedding` and `store_kv`); slot -1 skips a padded row."""
        rotary_and_store_kv(positions, q, k, v, rotary.cos, rotary.sin, k_cache, v_cache, slot_mapping)
        return q, k

    def graph_buffers(
        self,
        capacity: StepShape,
        *,
        max_context_len: int,
        block_size: int,
        num_kv_heads: int,
        device: torch.device,
    ) -> TritonGraphBuffers:
        return TritonGraphBuffers(self, capacity, max_context_len, block_size, num_kv_heads, device)


class TritonGraphBuffers:
    """`TritonAttentionState` for CUDA graphs. A step's per-sequence lengths and rows are int32 parts
    (`parts`) of the graph's one input buffer, written on the host (`host_values`) and moved with the
    step's other inputs in one copy; the block tables, as wide as the longest context allows, are static
    tensors sized for `capacity` that `load_block_tables` fills from the step's compact tables. Smaller
    shapes use their leading rows.

    A capacity with no multi-row sequences holds the plain decode layout (sequence i is token row i).
    One of at most MAX_DECODE_QUERY_ROWS rows per sequence runs `capacity.num_seqs` sequences as decodes,
    each with its first row and row count. Any other holds `capacity.num_seqs` single-row and
    `capacity.num_multi_row_seqs` multi-row sequences, the extend kernel's grid covering `max_query_len`
    rows for each (programs past a sequence's rows exit at once). Padded sequences read no keys and
    write to the shape's last row.
    """

    def __init__(
        self,
        backend: TritonAttentionBackend,
        capacity: StepShape,
        max_context_len: int,
        block_size: int,
        num_kv_heads: int,
        device: torch.device,
    ) -> None:
        self.max_context_len = max_context_len
        self.num_kv_heads = num_kv_heads
        self.device = device
        width = -(-max_context_len // block_size)
        multi = capacity.num_multi_row_seqs
        # Few rows per sequence (drafts to verify): every sequence decodes; else multi-row ones extend.
        self.few_rows = (
            multi > 0 and capacity.max_query_len <= MAX_DECODE_QUERY_ROWS and not backend.batch_invariant
        )
        self.extends = multi > 0 and not self.few_rows
        self.block_tables = torch.zeros(capacity.num_seqs, width, dtype=torch.int32, device=device)
        self.extend_block_tables = (
            torch.zeros(multi, width, dtype=torch.int32, device=device) if self.extends else None
        )
        # Splits per shape are fixed at capture; a split past a row's context exits at once.
        self._splits: dict[StepShape, int] = {}

    def parts(self, shape: StepShape) -> list[Part]:
        """The int32 parts a graph of `shape` reads, each as long as the shape allows."""
        n, m = shape.num_seqs, shape.num_multi_row_seqs
        parts = [Part("context_lens", n, torch.int32)]
        if m:
            parts.append(Part("rows", n, torch.int32))  # each decoding sequence's first token row
        if self.few_rows:
            parts.append(Part("query_lens", n, torch.int32))
        if self.extends:
            parts += [
                Part("extend_context_lens", m, torch.int32),
                Part("extend_query_start_loc", m, torch.int32),
                Part("extend_query_lens", m, torch.int32),
            ]
        return parts

    def state(self, shape: StepShape, parts: Mapping[str, torch.Tensor]) -> TritonAttentionState:
        """The state a graph of `shape` captures: `parts` are its parts' views in the input buffer."""
        if shape not in self._splits:
            self._splits[shape] = choose_num_splits(
                shape.num_seqs, self.num_kv_heads, self.max_context_len, self.device
            )
        decode = DecodeRows(
            block_tables=self.block_tables[: shape.num_seqs],
            context_lens=parts["context_lens"],
            rows=parts.get("rows"),
            max_context_len=self.max_context_len,
            num_splits=self._splits[shape],
            query_lens=parts.get("query_lens"),
            max_query_len=shape.max_query_len if self.few_rows else 1,
        )
        if not self.extends:
            return TritonAttentionState(decode, None, zero_padding=self.few_rows)
        extend = ExtendRows(
            block_tables=self.extend_block_tables[: shape.num_multi_row_seqs],
            context_lens=parts["extend_context_lens"],
            query_start_loc=parts["extend_query_start_loc"],
            query_lens=parts["extend_query_lens"],
            max_query_len=shape.max_query_len,
        )
        return TritonAttentionState(decode, extend, zero_padding=True)

    def host_values(
        self, query_lens: list[int], context_lens: list[int], shape: StepShape
    ) -> tuple[dict[str, list[int]], list[int], int]:
        """A step's values of the parts of `shape`, padded; the order in which `load_block_tables` wants
        the sequences' tables, and how many of them (the first) decode."""
        n, pad_row = len(query_lens), shape.num_rows - 1
        seq_pad = shape.num_seqs - n
        if not shape.num_multi_row_seqs:  # the plain decode layout
            return {"context_lens": context_lens + [0] * seq_pad}, list(range(n)), n
        starts = [0] * n
        for i in range(1, n):
            starts[i] = starts[i - 1] + query_lens[i - 1]
        if self.few_rows:
            values = {
                "context_lens": context_lens + [0] * seq_pad,
                "rows": starts + [pad_row] * seq_pad,
                "query_lens": query_lens + [0] * seq_pad,
            }
            return values, list(range(n)), n
        decodes = [i for i in range(n) if query_lens[i] == 1]
        extends = [i for i in range(n) if query_lens[i] > 1]
        seq_pad = shape.num_seqs - len(decodes)
        ext_pad = shape.num_multi_row_seqs - len(extends)
        values = {
            "context_lens": [context_lens[i] for i in decodes] + [0] * seq_pad,
            "rows": [starts[i] for i in decodes] + [pad_row] * seq_pad,
            "extend_context_lens": [context_lens[i] for i in extends] + [0] * ext_pad,
            "extend_query_start_loc": [starts[i] for i in extends] + [0] * ext_pad,
            "extend_query_lens": [query_lens[i] for i in extends] + [0] * ext_pad,
        }
        return values, decodes + extends, len(decodes)

    def load_block_tables(self, tables: torch.Tensor, num_decoding: int) -> None:
        """The step's tables ([sequences, blocks], in `host_values`' order, its first `num_decoding`
        decoding) into the static ones; columns past the step's width keep stale blocks nobody reads."""
        width = tables.shape[1]
        self.block_tables[:num_decoding, :width].copy_(tables[:num_decoding])
        if tables.shape[0] > num_decoding:
            self.extend_block_tables[: tables.shape[0] - num_decoding, :width].copy_(tables[num_decoding:])
