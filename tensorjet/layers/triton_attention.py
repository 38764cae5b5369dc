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

from dataclasses import dataclass

import torch

from tensorjet.kernels.decode_attention import choose_num_splits, decode_attention
from tensorjet.kernels.extend_attention import extend_attention
from tensorjet.kernels.rotary import rotary_and_store_kv
from tensorjet.layers.attention import AttentionMetadata, StepShape

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
    """`TritonAttentionState` in static tensors sized for `capacity`; smaller shapes use their leading
    rows. A capacity with no multi-row sequences holds the plain decode layout. One of at most
    MAX_DECODE_QUERY_ROWS rows per sequence runs `capacity.num_seqs` sequences as decodes, each with its
    first row and row count. Any other holds `capacity.num_seqs` single-row and
    `capacity.num_multi_row_seqs` multi-row sequences, the extend kernel's grid covering
    `max_query_len` rows for each (programs past a sequence's rows exit at once).
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
        self.backend = backend
        self.max_context_len = max_context_len
        self.num_kv_heads = num_kv_heads
        self.device = device
        width = -(-max_context_len // block_size)
        seqs, multi = capacity.num_seqs, capacity.num_multi_row_seqs
        # Few rows per sequence (drafts to verify): every sequence decodes; else multi-row ones extend.
        self.few_rows = (
            multi > 0 and capacity.max_query_len <= MAX_DECODE_QUERY_ROWS and not backend.batch_invariant
        )
        with torch.device(device):
            self.decode = DecodeRows(
                block_tables=torch.zeros(seqs, width, dtype=torch.int32),
                context_lens=torch.zeros(seqs, dtype=torch.int32),
                rows=torch.zeros(seqs, dtype=torch.int32) if multi else None,
                max_context_len=max_context_len,
                query_lens=torch.zeros(seqs, dtype=torch.int32) if self.few_rows else None,
            )
            self.extend = None
            if multi and not self.few_rows:
                self.extend = ExtendRows(
                    block_tables=torch.zeros(multi, width, dtype=torch.int32),
                    context_lens=torch.zeros(multi, dtype=torch.int32),
                    query_start_loc=torch.zeros(multi, dtype=torch.int32),
                    query_lens=torch.zeros(multi, dtype=torch.int32),
                    max_query_len=capacity.max_query_len,
                )
            if multi:
                self.row_ids = torch.arange(seqs, dtype=torch.int32)  # a step's rows when all decode
        # Splits per shape are fixed at capture; a split past a row's context exits at once.
        self._splits: dict[StepShape, int] = {}

    def state(self, shape: StepShape) -> TritonAttentionState:
        if shape not in self._splits:
            self._splits[shape] = choose_num_splits(
                shape.num_seqs, self.num_kv_heads, self.max_context_len, self.device
            )
        d, n = self.decode, shape.num_seqs
        decode = DecodeRows(
            block_tables=d.block_tables[:n],
            context_lens=d.context_lens[:n],
            rows=None if d.rows is None else d.rows[:n],
            max_context_len=self.max_context_len,
            num_splits=self._splits[shape],
            query_lens=None if d.query_lens is None else d.query_lens[:n],
            max_query_len=shape.max_query_len if self.few_rows else 1,
        )
        if self.extend is None:
            return TritonAttentionState(decode, None, zero_padding=self.few_rows)
        e, m = self.extend, shape.num_multi_row_seqs
        extend = ExtendRows(
            block_tables=e.block_tables[:m],
            context_lens=e.context_lens[:m],
            query_start_loc=e.query_start_loc[:m],
            query_lens=e.query_lens[:m],
            max_query_len=shape.max_query_len,
        )
        return TritonAttentionState(decode, extend, zero_padding=True)

    def fill(self, meta: AttentionMetadata, shape: StepShape) -> None:
        if self.extend is None and not self.few_rows:
            self._fill_decode_layout(meta, shape)
            return
        step = self.backend.prepare(meta, max_decode_rows=shape.max_query_len if self.few_rows else 1)
        d, n = step.decode, 0
        if d is not None:
            n = d.context_lens.shape[0]
            self._copy_rows(self.decode, d, n)
            self.decode.rows[:n].copy_(self.row_ids[:n] if d.rows is None else d.rows)
            if self.few_rows and d.query_lens is None:  # a step of single rows: one each
                self.decode.query_lens[:n].fill_(1)
            elif self.few_rows:
                self.decode.query_lens[:n].copy_(d.query_lens)
        self.decode.context_lens[n : shape.num_seqs].fill_(0)  # padded: no keys to read ...
        self.decode.rows[n : shape.num_seqs].fill_(shape.num_rows - 1)  # ... output to the padding row
        if self.few_rows:
            self.decode.query_lens[n : shape.num_seqs].fill_(0)  # (or none at all)
            return
        e, m = step.extend, 0
        if e is not None:
            m = e.context_lens.shape[0]
            self._copy_rows(self.extend, e, m)
            self.extend.query_start_loc[:m].copy_(e.query_start_loc)
            self.extend.query_lens[:m].copy_(e.query_lens)
        self.extend.query_lens[m : shape.num_multi_row_seqs].fill_(0)  # padded: no query rows

    def _fill_decode_layout(self, meta: AttentionMetadata, shape: StepShape) -> None:
        """A decode-only step straight from the runner's tensors: no `prepare` (and no copy) needed."""
        n = meta.num_seqs
        tables = meta.block_tables
        self.decode.context_lens[:n].copy_(meta.context_lens_tensor)
        self.decode.block_tables[:n, : tables.shape[1]].copy_(tables)
        if shape.num_seqs > n:  # padded rows read no keys (stale tables are harmless)
            self.decode.context_lens[n : shape.num_seqs].fill_(0)

    @staticmethod
    def _copy_rows(static: DecodeRows | ExtendRows, step: DecodeRows | ExtendRows, n: int) -> None:
        """The first n sequences' tables and context lengths (tables keep stale columns past the step's
        width, which nothing reads)."""
        static.block_tables[:n, : step.block_tables.shape[1]].copy_(step.block_tables)
        static.context_lens[:n].copy_(step.context_lens)
