"""Steps replayed from CUDA graphs.

A decode step of a large model is hundreds of small kernel launches; launched one by one from Python
the GPU waits on the CPU (our eager batch-1 step was 40 ms against a 3.8 ms bandwidth limit). Here the
whole decode forward plus the LM head is captured once per batch-size bucket and replayed with one
launch. Inputs live in static buffers sized for the largest bucket; a batch of n sequences is padded
to the next bucket with rows that write no KV (slot -1) and attend to nothing (context length 0).

Buckets: 1, 2, 4, 8, then every 16 up to `max_batch_size`. `cuda_graph_cache_size` caps how many
decode graphs are kept: that many buckets are picked evenly from the ladder (the largest always
kept), so a smaller cache captures faster and holds less memory but pads more.

Small mixed steps (sequences with several query rows, with or without decodes) are captured too
(`MixedStepGraphs`): with in-flight batching one comes whenever a finished request makes room for a new
prompt, and a step of a few hundred tokens takes less GPU time than launching its kernels from Python
does. With speculative decoding, steps whose sequences have a few rows each (drafts to verify) replay
`VerifyGraphs`, one per batch-size bucket. Steps that no graph holds run eagerly. All graphs share one
memory pool (each ladder captured largest first, so smaller graphs reuse its blocks).

The attention backend owns its part of the static state (`GraphAttentionBackend.graph_buffers`): this
module says which `StepShape` each graph holds and hands each step's metadata to the backend's buffers.

Without a GPU there is nothing to capture: the same padded static-buffer path then runs eagerly, so
the CPU tests exercise the bucketing and padding that the GPU replays.
"""

from __future__ import annotations

import logging
import time

import torch

from tensorjet.layers.attention import AttentionMetadata, GraphAttentionBackend, StepShape

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int, cache_size: int | None = None) -> list[int]:
    """The bucket ladder, ascending; at most `cache_size` buckets, always including max_batch_size."""
    ladder = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    ladder += list(range(16, max_batch_size, 16)) + [max_batch_size]
    if cache_size is None or cache_size >= len(ladder):
        return ladder
    last = len(ladder) - 1
    if cache_size == 1:
        return [ladder[last]]
    picks = {round(i * last / (cache_size - 1)) for i in range(cache_size)}
    return [ladder[i] for i in sorted(picks)]


def _graph_metadata(slot_mapping: torch.Tensor, block_size: int, state: object) -> AttentionMetadata:
    """A captured step's metadata: its attention state is the backend's static one (its per-step
    lengths are not read: `state` stands in for the backend's prepare())."""
    return AttentionMetadata(
        query_lens=[],
        context_lens=[],
        slot_mapping=slot_mapping,
        block_tables=torch.empty(0, 0, dtype=torch.int32),
        block_size=block_size,
        state=state,
    )


class DecodeGraphs:
    """Static input buffers plus one captured decode graph (or, on CPU, an eager run) per bucket."""

    def __init__(
        self,
        model: torch.nn.Module,
        backend: GraphAttentionBackend,
        max_batch_size: int,
        block_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        device: torch.device,
        cache_size: int | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_batch_size, cache_size)
        self.shapes = {bs: StepShape(bs, bs, num_multi_row_seqs=0, max_query_len=1) for bs in self.sizes}
        self.capture = device.type == "cuda"
        n = self.sizes[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.long)
            self.positions = torch.zeros(n, dtype=torch.long)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.long)
            self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32)
        self.attention = backend.graph_buffers(
            self.shapes[n],
            max_context_len=max_seq_len,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            device=device,
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_seqs: int) -> int:
        return next(bs for bs in self.sizes if bs >= num_seqs)

    def _forward(self, bs: int) -> None:
        meta = _graph_metadata(self.slot_mapping[:bs], self.block_size, self.attention.state(self.shapes[bs]))
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], meta)
        self.model.compute_logits(hidden, out=self.logits[:bs])

    def capture_all(self, pool=None) -> None:
        """Capture every bucket into `pool` (a new one when None; `self.pool` afterwards)."""
        if self.capture:
            self.pool = _capture(self.graphs, self.sizes, self._forward, pool, "decode", "batch sizes")

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [n, vocab] of n decode rows; a view into a static buffer, valid until the next run.
        `meta` is the step's own metadata (host lengths, device tables and context lengths)."""
        n = input_ids.shape[0]
        bs = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        if bs > n:  # padded rows write no KV (stale ids/positions are harmless; attention pads its own)
            self.slot_mapping[n:bs].fill_(-1)
        self.attention.fill(meta, self.shapes[bs])
        if self.capture:
            self.graphs[bs].replay()
        else:
            self._forward(bs)
        return self.logits[:n]


MIXED_TOKEN_BUCKETS = (32, 64, 128, 256, 512)  # token counts of the mixed steps replayed from graphs
# Sequences with several query rows (prompt chunks, drafts to verify) a graphed mixed step holds; a step
# with more runs eagerly.
MIXED_MAX_MULTI_ROW_SEQS = 8
# The largest verify graph's sequences: its logits buffer holds every row of each (64 x 6 rows of a
# 128k vocabulary in fp32: 197 MB at k = 5); larger speculating steps take the mixed-step ladder or run
# eagerly.
VERIFY_MAX_SEQS = 64


def mixed_token_buckets(max_num_tokens: int) -> list[int]:
    """The mixed-step ladder, ascending, capped at `max_num_tokens` (steps never exceed it)."""
    largest = min(max_num_tokens, MIXED_TOKEN_BUCKETS[-1])
    return [t for t in MIXED_TOKEN_BUCKETS if t < largest] + [largest]


class _MultiRowGraphs:
    """Static buffers and one graph per bucket for steps with multi-row sequences. Bucket b's graph runs
    `shapes[b].num_rows` token rows (the last always padding) and reads `sampled_rows[b]` logits rows;
    every launch size is fixed by its `StepShape`, so the attention state lives in the backend's static
    buffers, which pad what a step leaves empty. Padded sampled rows read the padding row's logits; token
    rows past the step's own are padding too: slot -1 (no KV written), outputs never read. The largest
    bucket is the largest in every dimension."""

    def __init__(
        self,
        model: torch.nn.Module,
        backend: GraphAttentionBackend,
        shapes: dict[int, StepShape],
        sampled_rows: dict[int, int],
        block_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sizes = sorted(shapes)
        self.shapes = shapes
        self.sampled_rows = sampled_rows
        self.capture = device.type == "cuda"
        largest = shapes[self.sizes[-1]]
        with torch.device(device):
            self.input_ids = torch.zeros(largest.num_rows, dtype=torch.long)
            self.positions = torch.zeros(largest.num_rows, dtype=torch.long)
            self.slot_mapping = torch.full((largest.num_rows,), -1, dtype=torch.long)
            self.logits_rows = torch.zeros(sampled_rows[self.sizes[-1]], dtype=torch.long)
            self.logits = torch.empty(
                sampled_rows[self.sizes[-1]], model.config.vocab_size, dtype=torch.float32
            )
        self.attention = backend.graph_buffers(
            largest,
            max_context_len=max_seq_len,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            device=device,
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _forward(self, size: int) -> None:
        rows, sampled = self.shapes[size].num_rows, self.sampled_rows[size]
        meta = _graph_metadata(
            self.slot_mapping[:rows], self.block_size, self.attention.state(self.shapes[size])
        )
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], meta)
        self.model.compute_logits(hidden[self.logits_rows[:sampled]], out=self.logits[:sampled])

    def _run(self, size: int, input_ids, positions, logits_indices, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        shape = self.shapes[size]
        pad_row = shape.num_rows - 1
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n : shape.num_rows].fill_(-1)
        self.attention.fill(meta, shape)
        num_sampled = logits_indices.shape[0]
        self.logits_rows[:num_sampled].copy_(logits_indices)
        self.logits_rows[num_sampled : self.sampled_rows[size]].fill_(pad_row)
        if self.capture:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.logits[:num_sampled]


class MixedStepGraphs(_MultiRowGraphs):
    """Steps with multi-row sequences (prompt chunks, drafts to verify), up to `MIXED_TOKEN_BUCKETS[-1]`
    tokens and `MIXED_MAX_MULTI_ROW_SEQS` such sequences, replayed from one graph per token-count bucket.

    The graph of bucket T runs T + 1 token rows (the last always padding) for min(T, max_batch_size)
    sequences, MIXED_MAX_MULTI_ROW_SEQS of them multi-row, up to T rows each, and reads that many sampled
    rows' logits.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: GraphAttentionBackend,
        max_batch_size: int,
        max_num_tokens: int,
        block_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        self.max_batch_size = max_batch_size
        sizes = mixed_token_buckets(max_num_tokens)
        shapes = {
            t: StepShape(t + 1, self.seq_capacity(t), MIXED_MAX_MULTI_ROW_SEQS, max_query_len=t)
            for t in sizes
        }
        sampled = {t: self.seq_capacity(t) for t in sizes}
        super().__init__(model, backend, shapes, sampled, block_size, num_kv_heads, max_seq_len, device)

    def seq_capacity(self, tokens: int) -> int:
        return min(tokens, self.max_batch_size)

    def bucket(self, num_tokens: int) -> int:
        return next(t for t in self.sizes if t >= num_tokens)

    def fits(self, query_lens: list[int], num_sampled: int = 0) -> bool:
        """Whether a step (query rows per sequence, sampled rows) can replay a graph."""
        multi_row = sum(1 for n in query_lens if n > 1)
        tokens = sum(query_lens)
        return (
            0 < multi_row <= MIXED_MAX_MULTI_ROW_SEQS
            and tokens <= self.sizes[-1]
            and num_sampled <= self.sampled_rows[self.bucket(tokens)]
        )

    def capture_all(self, pool=None) -> None:
        if self.capture:
            _capture(self.graphs, self.sizes, self._forward, pool, "mixed-step", "token counts")

    def run(self, input_ids, positions, logits_indices, meta: AttentionMetadata) -> torch.Tensor:
        """Logits of the step's sampled rows (`logits_indices`); a view into a static buffer, valid
        until the next run. `meta` is the step's own metadata (host lengths, device tables)."""
        return self._run(self.bucket(input_ids.shape[0]), input_ids, positions, logits_indices, meta)


class VerifyGraphs(_MultiRowGraphs):
    """Steps whose sequences have at most `rows_per_seq` query rows each, every row's logits read: a
    target verifying up to rows_per_seq - 1 drafts per sequence, or a draft model's first step of a round
    (the last token and, after a fully accepted round, its own last draft). One graph per batch-size
    bucket (`graph_batch_sizes`, up to VERIFY_MAX_SEQS) of n sequences: n * rows_per_seq + 1 token rows,
    all n possibly multi-row, so a step pads only to its bucket, not to a token count of the mixed ladder.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: GraphAttentionBackend,
        max_batch_size: int,
        rows_per_seq: int,
        block_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        self.rows_per_seq = rows_per_seq
        sizes = graph_batch_sizes(min(max_batch_size, VERIFY_MAX_SEQS))
        shapes = {n: StepShape(n * rows_per_seq + 1, n, n, max_query_len=rows_per_seq) for n in sizes}
        sampled = {n: n * rows_per_seq for n in sizes}
        super().__init__(model, backend, shapes, sampled, block_size, num_kv_heads, max_seq_len, device)

    def fits(self, query_lens: list[int]) -> bool:
        return len(query_lens) <= self.sizes[-1] and max(query_lens) <= self.rows_per_seq

    def capture_all(self, pool=None) -> None:
        if self.capture:
            _capture(self.graphs, self.sizes, self._forward, pool, f"{self.rows_per_seq}-row", "batch sizes")

    def run(self, input_ids, positions, logits_indices, meta: AttentionMetadata) -> torch.Tensor:
        """Logits of the step's sampled rows; a view into a static buffer, valid until the next run."""
        size = next(n for n in self.sizes if n >= meta.num_seqs)
        return self._run(size, input_ids, positions, logits_indices, meta)


@torch.inference_mode()
def _capture(graphs: dict, sizes: list[int], forward, pool, kind: str, unit: str):
    """Capture forward(size) for every size, largest first (smaller graphs reuse its pool blocks)."""
    start = time.perf_counter()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for size in reversed(sizes):
            forward(size)  # warm-up: compiles the kernels and settles the allocator
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                forward(size)
            graphs[size] = graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    logger.info(
        "captured %d %s CUDA graphs (%s %s) in %.1fs",
        len(graphs),
        kind,
        unit,
        _ranges(sizes),
        time.perf_counter() - start,
    )
    return pool


def _ranges(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else f"{sizes[0]}, {sizes[1]}, ... {sizes[-1]}"
