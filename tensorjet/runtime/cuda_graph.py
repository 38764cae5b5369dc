"""Steps replayed from CUDA graphs.

A decode step of a large model is hundreds of small kernel launches; launched one by one from Python
the GPU waits on the CPU (our eager batch-1 step was 40 ms against a 3.8 ms bandwidth limit). Here the
whole decode forward plus the LM head is captured once per batch-size bucket and replayed with one
launch. Every number a graph reads (token ids, positions, cache slots, sampled rows, the attention
backend's lengths and rows) sits in one static input buffer, at a layout fixed per bucket; a step's
values, padded to its bucket, reach it with one host-to-device copy (`StepUpload`), and only the block
tables take a second, device-side copy into the backend's static tables. A batch of n sequences is
padded to the next bucket with rows that write no KV (slot -1) and attend to nothing (context length
0).

Buckets: 1, 2, 4, 8, then every 16 up to `max_batch_size`. `cuda_graph_cache_size` caps how many
decode graphs are kept: that many buckets are picked evenly from the ladder (the largest always
kept), so a smaller cache captures faster and holds less memory but pads more.

Small mixed steps (sequences with several query rows, with or without decodes) are captured too
(`MixedStepGraphs`): with in-flight batching one comes whenever a finished request makes room for a new
prompt, and a step of a few hundred tokens takes less GPU time than launching its kernels from Python
does. With speculative decoding, steps whose sequences have a few rows each (drafts to verify) replay
`VerifyGraphs`, one per batch-size bucket. Steps that no graph holds run eagerly. All graphs share one
memory pool (each ladder captured largest first, so smaller graphs reuse its blocks).

The attention backend says what its part of a graph's inputs is (`GraphAttentionBackend.graph_buffers`):
this module says which `StepShape` each graph holds and lays out and uploads the backend's values with
its own.

Without a GPU there is nothing to capture: the same padded static-buffer path then runs eagerly, so
the CPU tests exercise the bucketing and padding that the GPU replays.
"""

from __future__ import annotations

import logging
import time

import torch

from tensorjet.layers.attention import AttentionMetadata, GraphAttentionBackend, StepShape
from tensorjet.layers.step_layout import Layout, Part
from tensorjet.runtime.device_io import StepUpload
from tensorjet.runtime.step_values import StepValues

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
    """A captured step's metadata: its attention state is the backend's static one (its per-step lengths
    are not read: `state` stands in for the backend's prepare())."""
    return AttentionMetadata(
        query_lens=[],
        context_lens=[],
        slot_mapping=slot_mapping,
        block_tables=torch.empty(0, 0, dtype=torch.int32),
        block_size=block_size,
        state=state,
    )


class StepGraphs:
    """One static input buffer and one captured graph (or, on CPU, an eager run) per size.

    The graph of a size holds `shapes[size]`: its rows' ids, positions and slots, the rows whose logits
    it computes (`sampled_rows[size]` of them, at `logits_rows`; every row's when `sampled_rows` is None)
    and the attention backend's parts, laid out in that order from the buffer's start. A step's lookups
    (pending tokens, drafts) and block tables follow at lengths of its own: the graph does not read
    them, the runner and the backend's table copy do."""

    def __init__(
        self,
        model: torch.nn.Module,
        backend: GraphAttentionBackend,
        shapes: dict[int, StepShape],
        sampled_rows: dict[int, int] | None,
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
        largest = shapes[self.sizes[-1]]  # the largest in every dimension
        self.attention = backend.graph_buffers(
            largest,
            max_context_len=max_seq_len,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            device=device,
        )
        self.layouts = {size: Layout(self._graph_parts(size)) for size in self.sizes}
        most_blocks = largest.num_seqs * -(-max_seq_len // block_size)
        most = Layout(
            [
                Part("fill_rows", largest.num_seqs),
                Part("fill_from", largest.num_seqs),
                Part("draft_rows", largest.num_rows),
                Part("draft_entries", largest.num_rows),
                Part("block_tables", most_blocks, torch.int32),
            ],
            start=self.layouts[self.sizes[-1]].end,
        )
        self.buffer = torch.zeros(most.end, dtype=torch.uint8, device=device)
        self.inputs = {size: layout.views(self.buffer) for size, layout in self.layouts.items()}
        for inputs in self.inputs.values():
            inputs["slots"].fill_(-1)  # a capture's warm-up run writes no KV
        logits_rows = largest.num_rows if sampled_rows is None else sampled_rows[self.sizes[-1]]
        self.logits = torch.empty(logits_rows, model.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _graph_parts(self, size: int) -> list[Part]:
        rows = self.shapes[size].num_rows
        parts = [Part("input_ids", rows), Part("positions", rows), Part("slots", rows)]
        if self.sampled_rows is not None:
            parts.append(Part("logits_rows", self.sampled_rows[size]))
        return parts + self.attention.parts(self.shapes[size])

    def _forward(self, size: int) -> None:
        shape, inputs = self.shapes[size], self.inputs[size]
        meta = _graph_metadata(inputs["slots"], self.block_size, self.attention.state(shape, inputs))
        hidden = self.model(inputs["input_ids"], inputs["positions"], meta)
        if self.sampled_rows is None:
            self.model.compute_logits(hidden, out=self.logits[: shape.num_rows])
        else:
            rows = self.sampled_rows[size]
            self.model.compute_logits(hidden[inputs["logits_rows"]], out=self.logits[:rows])

    def upload(self, size: int, values: StepValues, upload: StepUpload) -> dict[str, torch.Tensor]:
        """A step's values into the buffer of the graph of `size` with one copy, then its block tables
        into the backend's. Rows past the step's are padding (slot -1: no KV written; their outputs
        never read), padded sampled rows read the last row, padded sequences read no keys. Returns the
        views of the graph's parts (padded) and of the step's lookups that it has."""
        shape = self.shapes[size]
        pad = shape.num_rows - values.num_rows
        host = {
            "input_ids": values.input_ids + [0] * pad,
            "positions": values.positions + [0] * pad,
            "slots": values.slots + [-1] * pad,
        }
        if self.sampled_rows is not None:
            unsampled = self.sampled_rows[size] - len(values.logits_indices)
            host["logits_rows"] = values.logits_indices + [shape.num_rows - 1] * unsampled
        attention, order, num_decoding = self.attention.host_values(
            values.query_lens, values.context_lens, shape
        )
        host.update(attention)
        for name in StepValues.LOOKUP_PARTS:
            host[name] = getattr(values, name)
        tables = host["block_tables"] = values.flat_block_tables(order)
        graph_layout = self.layouts[size]
        step_parts = [*values.lookup_parts(), values.block_table_part(tables)]
        step_layout = Layout(step_parts, start=graph_layout.end)
        upload([graph_layout, step_layout], host, out=self.buffer)
        parts = dict(self.inputs[size])
        for name in StepValues.LOOKUP_PARTS:
            if host[name]:
                parts[name] = step_layout.view(self.buffer, name)
        on_device = step_layout.view(self.buffer, "block_tables").view(values.num_seqs, -1)
        self.attention.load_block_tables(on_device, num_decoding)
        return parts

    def replay(self, size: int, num_logits: int) -> torch.Tensor:
        """Run the graph of `size` on the uploaded step: the logits of its first `num_logits` sampled
        rows, a view into a static buffer, valid until the next run."""
        if self.capture:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.logits[:num_logits]

    def capture_all(self, pool=None):
        """Capture every size into `pool` (a new one when None); returns the pool."""
        if self.capture:
            return _capture(self.graphs, self.sizes, self._forward, pool, self.kind, self.unit)
        return None


class DecodeGraphs(StepGraphs):
    """Steps of one query row per sequence, every sequence sampling: one graph per batch-size bucket."""

    kind, unit = "decode", "batch sizes"

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
        sizes = graph_batch_sizes(max_batch_size, cache_size)
        shapes = {bs: StepShape(bs, bs, num_multi_row_seqs=0, max_query_len=1) for bs in sizes}
        super().__init__(model, backend, shapes, None, block_size, num_kv_heads, max_seq_len, device)
        self.pool = None

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_seqs: int) -> int:
        return next(bs for bs in self.sizes if bs >= num_seqs)

    def size_for(self, values: StepValues) -> int | None:
        n = values.num_seqs
        if n > self.max_batch_size or values.num_rows != n or len(values.logits_indices) != n:
            return None
        return self.bucket(n)

    def capture_all(self, pool=None):
        self.pool = super().capture_all(pool)
        return self.pool


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


class MixedStepGraphs(StepGraphs):
    """Steps with multi-row sequences (prompt chunks, drafts to verify), up to `MIXED_TOKEN_BUCKETS[-1]`
    tokens and `MIXED_MAX_MULTI_ROW_SEQS` such sequences, replayed from one graph per token-count bucket.

    The graph of bucket T runs T + 1 token rows (the last always padding) for min(T, max_batch_size)
    sequences, MIXED_MAX_MULTI_ROW_SEQS of them multi-row, up to T rows each, and reads that many sampled
    rows' logits.
    """

    kind, unit = "mixed-step", "token counts"

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

    def size_for(self, values: StepValues) -> int | None:
        if not values.logits_indices or not self.fits(values.query_lens, len(values.logits_indices)):
            return None
        return self.bucket(values.num_rows)


class VerifyGraphs(StepGraphs):
    """Steps whose sequences have at most `rows_per_seq` query rows each, every row's logits read: a
    target verifying up to rows_per_seq - 1 drafts per sequence, or a draft model's first step of a round
    (the last token and, after a fully accepted round, its own last draft). One graph per batch-size
    bucket (`graph_batch_sizes`, up to VERIFY_MAX_SEQS) of n sequences: n * rows_per_seq + 1 token rows,
    all n possibly multi-row, so a step pads only to its bucket, not to a token count of the mixed ladder.
    """

    unit = "batch sizes"

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
        self.kind = f"{rows_per_seq}-row"
        sizes = graph_batch_sizes(min(max_batch_size, VERIFY_MAX_SEQS))
        shapes = {n: StepShape(n * rows_per_seq + 1, n, n, max_query_len=rows_per_seq) for n in sizes}
        sampled = {n: n * rows_per_seq for n in sizes}
        super().__init__(model, backend, shapes, sampled, block_size, num_kv_heads, max_seq_len, device)

    def fits(self, query_lens: list[int]) -> bool:
        return len(query_lens) <= self.sizes[-1] and max(query_lens) <= self.rows_per_seq

    def size_for(self, values: StepValues) -> int | None:
        if not values.logits_indices or not self.fits(values.query_lens):
            return None
        return next(n for n in self.sizes if n >= values.num_seqs)


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
