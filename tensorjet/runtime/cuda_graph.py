"""Decode steps replayed from CUDA graphs.

A decode step of a large model is hundreds of small kernel launches; launched one by one from Python
the GPU waits on the CPU (our eager batch-1 step was 40 ms against a 3.8 ms bandwidth limit). Here the
whole decode forward plus the LM head is captured once per batch-size bucket and replayed with one
launch. Inputs live in static buffers sized for the largest bucket; a batch of n sequences is padded
to the next bucket with rows that write no KV (slot -1) and attend to nothing (context length 0).

Buckets: 1, 2, 4, 8, then every 16 up to `max_batch_size`. `cuda_graph_cache_size` caps how many
graphs are kept: that many buckets are picked evenly from the ladder (the largest always kept), so a
smaller cache captures faster and holds less memory but pads more. A decode batch larger than the
largest bucket, and every step with prompt tokens, runs eagerly. All graphs share one memory pool
(captured largest first, so smaller ones reuse its blocks).

Without a GPU there is nothing to capture: the same padded static-buffer path then runs eagerly, so
the CPU tests exercise the bucketing and padding that the GPU replays.
"""

from __future__ import annotations

import logging
import time

import torch

from tensorjet.kernels.decode_attention import choose_num_splits
from tensorjet.layers.attention import AttentionMetadata

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
        self.logits[:bs].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def capture_all(self) -> None:
        if not self.capture:
            return
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):
                self._forward(bs)  # warm-up: compiles the kernels and settles the allocator
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(bs)
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1fs",
            len(self.graphs),
            _ranges(self.sizes),
            time.perf_counter() - start,
        )

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


def _ranges(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else f"{sizes[0]}, {sizes[1]}, ... {sizes[-1]}"
