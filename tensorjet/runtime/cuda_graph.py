"""Steps replayed from CUDA graphs.

A decode step of a large model is hundreds of small kernel launches; launched one by one from Python
the GPU waits on the CPU (our eager batch-1 step was 40 ms against a 3.8 ms bandwidth limit). Here the
whole decode forward plus the LM head is captured once per batch-size bucket and replayed with one
launch. Inputs live in static buffers sized for the largest bucket; a batch of n sequences is padded
to the next bucket with rows that write no KV (slot -1) and attend to nothing (context length 0).

Buckets: 1, 2, 4, 8, then every 16 up to `max_batch_size`. `cuda_graph_cache_size` caps how many
decode graphs are kept: that many buckets are picked evenly from the ladder (the largest always
kept), so a smaller cache captures faster and holds less memory but pads more.

Small mixed steps (prompt tokens, with or without decodes) are captured too (`MixedStepGraphs`): with
in-flight batching one comes whenever a finished request makes room for a new prompt, and a step of
a few hundred tokens takes less GPU time than launching its kernels from Python does. Steps that no
graph holds run eagerly. All graphs share one memory pool (each ladder captured largest first, so
smaller graphs reuse its blocks).

Without a GPU there is nothing to capture: the same padded static-buffer path then runs eagerly, so
the CPU tests exercise the bucketing and padding that the GPU replays.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from tensorjet.kernels.decode_attention import choose_num_splits
from tensorjet.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from tensorjet.kernels.backend import TritonAttentionBackend

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


class DecodeGraphs:
    """Static input buffers plus one captured decode graph (or, on CPU, an eager run) per bucket."""

    def __init__(
        self,
        model: torch.nn.Module,
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
        self.capture = device.type == "cuda"
        n = self.sizes[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.long)
            self.positions = torch.zeros(n, dtype=torch.long)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.long)
            self.context_lens = torch.zeros(n, dtype=torch.int32)
            self.block_tables = torch.zeros(n, -(-max_seq_len // block_size), dtype=torch.int32)
            self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32)
        # Splits per bucket are fixed at capture; a split past a row's context exits at once.
        self.num_splits = {bs: choose_num_splits(bs, num_kv_heads, max_seq_len, device) for bs in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_seqs: int) -> int:
        return next(bs for bs in self.sizes if bs >= num_seqs)

    def _metadata(self, bs: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            query_lens=[1] * bs,
            context_lens=[0] * bs,  # not read: the backend state below replaces its prepare()
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            block_size=self.block_size,
        )
        meta.cache["triton"] = {
            "decode": {
                "block_tables": self.block_tables[:bs],
                "context_lens": self.context_lens[:bs],
                "rows": None,
                "num_splits": self.num_splits[bs],
            },
            "extend": None,
        }
        return meta

    def _forward(self, bs: int) -> None:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._metadata(bs))
        self.model.compute_logits(hidden, out=self.logits[:bs])

    def capture_all(self, pool=None) -> None:
        """Capture every bucket into `pool` (a new one when None; `self.pool` afterwards)."""
        if self.capture:
            self.pool = _capture(self.graphs, self.sizes, self._forward, pool, "decode", "batch sizes")

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [n, vocab] of n decode rows; a view into a static buffer, valid until the next run."""
        n = input_ids.shape[0]
        bs = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.context_lens[:n].copy_(context_lens)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        if bs > n:  # padded rows: write no KV, read no KV (stale ids/positions/tables are harmless)
            self.slot_mapping[n:bs].fill_(-1)
            self.context_lens[n:bs].fill_(0)
        if self.capture:
            self.graphs[bs].replay()
        else:
            self._forward(bs)
        return self.logits[:n]


MIXED_TOKEN_BUCKETS = (32, 64, 128, 256, 512)  # token counts of the mixed steps replayed from graphs
MIXED_MAX_PROMPTS = 8  # prompt chunks a graphed mixed step holds; a step with more runs eagerly


def mixed_token_buckets(max_num_tokens: int) -> list[int]:
    """The mixed-step ladder, ascending, capped at `max_num_tokens` (steps never exceed it)."""
    largest = min(max_num_tokens, MIXED_TOKEN_BUCKETS[-1])
    return [t for t in MIXED_TOKEN_BUCKETS if t < largest] + [largest]


class MixedStepGraphs:
    """Steps with prompt tokens, up to `MIXED_TOKEN_BUCKETS[-1]` tokens and `MIXED_MAX_PROMPTS` prompt
    chunks, replayed from one graph per token-count bucket.

    The graph of bucket T runs T + 1 token rows; the last is always padding. Every launch size is
    fixed by the bucket, so the attention state lives in static buffers with fixed capacities:
    - decode rows: min(T, max_batch_size); a padded one has context length 0 and writes its (unused)
      output to the padding row;
    - prompt chunks: MIXED_MAX_PROMPTS; a padded one has query length 0, and the extend kernel's grid
      covers T query rows per chunk, so programs past a chunk's length exit at once;
    - sampled rows: min(T, max_batch_size); padded ones read the padding row's logits.
    Token rows past the step's own are padding too: slot -1 (no KV written), attention output zeroed,
    outputs never read.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: TritonAttentionBackend,
        max_batch_size: int,
        max_num_tokens: int,
        block_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.sizes = mixed_token_buckets(max_num_tokens)
        self.capture = device.type == "cuda"
        rows = self.sizes[-1] + 1
        seqs = self.seq_capacity(self.sizes[-1])
        width = -(-max_seq_len // block_size)
        with torch.device(device):
            self.input_ids = torch.zeros(rows, dtype=torch.long)
            self.positions = torch.zeros(rows, dtype=torch.long)
            self.slot_mapping = torch.full((rows,), -1, dtype=torch.long)
            self.logits_rows = torch.zeros(seqs, dtype=torch.long)
            self.logits = torch.empty(seqs, model.config.vocab_size, dtype=torch.float32)
            self.decode = {
                "block_tables": torch.zeros(seqs, width, dtype=torch.int32),
                "context_lens": torch.zeros(seqs, dtype=torch.int32),
                "rows": torch.zeros(seqs, dtype=torch.int32),
            }
            self.extend = {
                "block_tables": torch.zeros(MIXED_MAX_PROMPTS, width, dtype=torch.int32),
                "context_lens": torch.zeros(MIXED_MAX_PROMPTS, dtype=torch.int32),
                "query_start_loc": torch.zeros(MIXED_MAX_PROMPTS, dtype=torch.int32),
                "query_lens": torch.zeros(MIXED_MAX_PROMPTS, dtype=torch.int32),
            }
        self.num_splits = {
            t: choose_num_splits(self.seq_capacity(t), num_kv_heads, max_seq_len, device) for t in self.sizes
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def seq_capacity(self, tokens: int) -> int:
        return min(tokens, self.max_batch_size)

    def bucket(self, num_tokens: int) -> int:
        return next(t for t in self.sizes if t >= num_tokens)

    def fits(self, num_new_tokens: list[int]) -> bool:
        """Whether a step (tokens per sequence) can replay a graph."""
        prompts = sum(1 for n in num_new_tokens if n > 1)
        return 0 < prompts <= MIXED_MAX_PROMPTS and sum(num_new_tokens) <= self.sizes[-1]

    def _metadata(self, tokens: int) -> AttentionMetadata:
        seqs = self.seq_capacity(tokens)
        meta = AttentionMetadata(
            query_lens=[],  # not read: the backend state below replaces its prepare()
            context_lens=[],
            slot_mapping=self.slot_mapping[: tokens + 1],
            block_tables=self.decode["block_tables"][:seqs],
            block_size=self.block_size,
        )
        decode = {key: value[:seqs] for key, value in self.decode.items()}
        meta.cache["triton"] = {
            "decode": decode | {"num_splits": self.num_splits[tokens]},
            "extend": self.extend | {"max_query_len": tokens},
            "padded": True,
        }
        return meta

    def _forward(self, tokens: int) -> None:
        rows, seqs = tokens + 1, self.seq_capacity(tokens)
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], self._metadata(tokens))
        self.model.compute_logits(hidden[self.logits_rows[:seqs]], out=self.logits[:seqs])

    def capture_all(self, pool=None) -> None:
        if self.capture:
            _capture(self.graphs, self.sizes, self._forward, pool, "mixed-step", "token counts")

    def run(self, input_ids, positions, logits_indices, meta: AttentionMetadata) -> torch.Tensor:
        """Logits of the step's sampled rows (`logits_indices`); a view into a static buffer, valid
        until the next run. `meta` is the step's own metadata (host lengths, device tables)."""
        n = input_ids.shape[0]
        tokens = self.bucket(n)
        pad_row, seqs = tokens, self.seq_capacity(tokens)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n : tokens + 1].fill_(-1)
        self.backend.prepare(meta, self.device)
        state = meta.cache["triton"]
        _fill(self.decode, state["decode"], pad={"context_lens": 0, "rows": pad_row}, capacity=seqs)
        _fill(self.extend, state["extend"], pad={"query_lens": 0}, capacity=MIXED_MAX_PROMPTS)
        num_sampled = logits_indices.shape[0]
        self.logits_rows[:num_sampled].copy_(logits_indices)
        self.logits_rows[num_sampled:seqs].fill_(pad_row)
        if self.capture:
            self.graphs[tokens].replay()
        else:
            self._forward(tokens)
        return self.logits[:num_sampled]


def _fill(static: dict, step: dict | None, pad: dict, capacity: int) -> None:
    """Copy a step's attention state (decode or extend rows) into the static buffers; the remaining
    rows up to `capacity` get the `pad` values (tables and unpadded fields keep stale values, which
    nothing reads)."""
    num = 0 if step is None else step["context_lens"].shape[0]
    if num:
        tables = step["block_tables"]
        static["block_tables"][:num, : tables.shape[1]].copy_(tables)
        for key in static.keys() - {"block_tables"}:  # a mixed step's decode rows always name their rows
            static[key][:num].copy_(step[key])
    for key, value in pad.items():
        static[key][num:capacity].fill_(value)


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
