"""Runs the model for one scheduled step: builds device inputs, owns the KV cache, samples.

The runner knows nothing about requests, sequences or policies: it gets a `StepBatch` (plain data,
`tensorjet.runtime.step`) and returns a `StepHandle` whose result holds the tokens sampled for the
sequences that asked for one (several, for a sequence whose drafts it verified).

It starts in two phases: the constructor loads the model; `start(num_blocks)` allocates the KV cache and
captures the graphs. In between the engine sizes one pool of blocks for every runner that shares its
block tables (a target and its draft model) with `kv_cache_blocks`.

Under tensor parallelism (`parallel`) a runner runs in every rank's process with its rank's share of the
weights and KV heads, and every rank goes through both phases together. Rank 0's `prepare` sends each
step's values to the others (`StepChannel`), which run it with `run_worker_step`; only rank 0 samples. A
draft model runs whole on rank 0, beside its share of the target.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import torch

from tensorjet.config import EngineConfig
from tensorjet.distributed import SINGLE
from tensorjet.dtypes import is_fp8
from tensorjet.layers.attention import AttentionMetadata, GraphAttentionBackend, TorchAttentionBackend
from tensorjet.layers.batch_invariant import RowwiseAttentionBackend
from tensorjet.layers.step_layout import Layout, Part
from tensorjet.models import derived_cache
from tensorjet.models.llama import LlamaForCausalLM, head_dim_of
from tensorjet.models.loader import ModelSource, iter_weights
from tensorjet.quant.formats import quantization_spec
from tensorjet.runtime.device_io import StepUpload
from tensorjet.runtime.kernel_selection import head_method_for, linear_method_for, select_kernels
from tensorjet.runtime.rejection_sampler import RejectionSampler, VerifiedTokens
from tensorjet.runtime.sampler import SampledTokens, Sampler, SamplingRow, TokenBitmask
from tensorjet.runtime.step import DeviceDrafts, PendingPromptLogprobs, StepBatch, StepHandle, StepSequence
from tensorjet.runtime.step_values import StepValues

if TYPE_CHECKING:
    from tensorjet.runtime.cuda_graph import DecodeGraphs, MixedStepGraphs, StepGraphs, VerifyGraphs
    from tensorjet.runtime.parallel import ParallelGroup
    from tensorjet.runtime.step_channel import StepMessage

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """A step on the device, flattened over its sequences' query rows."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    # The graph that replays the step (its family and size; its buffers hold the inputs), or None: the
    # step runs eagerly with `meta` and `logits_indices` (the rows whose logits are sampled).
    graph: tuple[StepGraphs, int] | None
    meta: AttentionMetadata | None
    logits_indices: torch.Tensor | None
    num_logits: int  # how many rows' logits are sampled
    sampled_seq_ids: list[int]  # whose they are (one entry per sequence) ...
    sampling_rows: list[SamplingRow]
    num_drafts: list[int]  # ... and how many drafts each verifies (its logits rows: 1 + that)
    draft_rows: torch.Tensor | None  # the rows holding drafts, in order (None or empty: none)
    draft_entries: torch.Tensor | None  # their entries in the batch's DeviceDrafts (None or empty: none)
    drafts: DeviceDrafts | None
    prompt_rows: list[int]  # rows whose prompt logprobs are reported ...
    prompt_seqs: list[StepSequence]  # ... for these sequences' requests, in order

    @property
    def verifies(self) -> bool:
        return any(self.num_drafts)


OUT_OF_MEMORY_ADVICE = (
    "Lower max_num_tokens (activation memory) or max_batch_size, lower kv_cache_free_gpu_mem_fraction "
    "or set kv_cache_max_tokens (KV pool), set cuda_graph_cache_size lower or enable_cuda_graph=False, "
    "or use a smaller or quantized model."
)


@contextlib.contextmanager
def _explain_out_of_memory(stage: str):
    """Turn a start-up OOM into a message that says what to lower (the guide's "Common Issues")."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise RuntimeError(f"out of GPU memory while {stage}. {OUT_OF_MEMORY_ADVICE}") from error


class ModelRunner:
    """draft: this runner is a draft model's; its steps keep the distributions they sample from, and its
    graphs hold first steps of two rows per sequence (`VerifyGraphs`). parallel: this rank's place among
    the tensor-parallel ranks (None: the whole model in this process)."""

    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        max_seq_len: int,
        parallel: ParallelGroup | None = None,
        draft: bool = False,
    ) -> None:
        self.config = config
        self.parallel = parallel  # this rank's place among the tensor-parallel ranks; None: one process
        self.tp = SINGLE if parallel is None else parallel.tp
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_cache_torch_dtype
        self.block_size = config.cache.block_size
        self.max_seq_len = max_seq_len
        self.draft = draft
        hf_config = source.hf_config
        self.head_dim = head_dim_of(hf_config)
        self.num_layers = hf_config.num_hidden_layers
        self.sampler = Sampler(config.runtime.seed)
        self.upload = StepUpload(self.device)
        self.verifier = RejectionSampler(self.sampler)
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedStepGraphs | None = None
        self.verify_graphs: VerifyGraphs | None = None
        self.num_graph_steps = 0  # steps replayed from a decode graph
        self.num_mixed_graph_steps = 0  # steps with prompt tokens replayed from a mixed-step graph
        self.num_verify_graph_steps = 0  # steps with drafts replayed from a verify graph
        self.num_blocks = 0
        with _explain_out_of_memory("loading the model weights"):
            self._load_model(source)
        if parallel is not None:  # every rank has its weights: the device collectives start together
            parallel.channel.barrier()
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads  # this rank's (tensor parallelism)
        self.attention_backend = self._select_attention_backend()

    def start(self, num_blocks: int) -> None:
        """Allocate a KV cache of `num_blocks` blocks and capture the step graphs."""
        with _explain_out_of_memory("sizing and allocating the KV cache"):
            self.num_blocks = num_blocks
            self._allocate_kv_cache(num_blocks)
        if self.config.uses_step_graphs(self.attention_backend):
            with _explain_out_of_memory("capturing CUDA graphs"):
                self.decode_graphs = self._build_decode_graphs()
                self.mixed_graphs = self._build_mixed_graphs()
                self.verify_graphs = self._build_verify_graphs()
        if self.parallel is not None:  # past the start-up collectives: a stop message reaches the workers now
            self.parallel.starting = False

    @property
    def verify_rows_per_seq(self) -> int:
        """Query rows per sequence the verify graphs hold: 1 + drafts for a target that speculates, two
        for a draft model; 0: no verify graphs."""
        if self.draft:
            return 2
        k = self.config.speculative.num_tokens
        return k + 1 if k else 0

    # ---- tensor parallelism: the other ranks ----------------------------------------------------
    def watch_workers(self, on_failure: Callable[[str], None]) -> None:
        """Call `on_failure(reason)` once, from a watchdog thread, if another rank's process goes away.
        Nothing to watch in one process."""
        if self.parallel is not None and self.parallel.workers is not None:
            self.parallel.workers.watch(on_failure)

    def worker_failure(self) -> str | None:
        """After a failed step: why another rank's process is gone, or None (all run, or none)."""
        if self.parallel is None or self.parallel.workers is None:
            return None
        return self.parallel.workers.failure_after_error()

    def shutdown(self) -> None:
        """Stop the other ranks' processes and leave their process group (nothing in one process)."""
        if self.parallel is not None:
            self.parallel.shutdown()

    def _load_model(self, source: ModelSource) -> None:
        start = time.perf_counter()
        gguf_wanted = self.config.quantization == "gguf" or self.config.gguf_blocks_by_default
        self.quantization = quantization_spec(
            self.config.quantization,
            source.quantization_config,
            dummy=source.kind == "dummy",
            gguf_types=source.gguf_tensor_types if gguf_wanted else None,  # read only where it may run
            gguf_by_default=self.config.gguf_blocks_by_default,
        )
        with torch.device(self.device):
            self.model = LlamaForCausalLM(
                source.hf_config,
                self.dtype,
                linear_method=linear_method_for(self.config, self.quantization),
                kv_cache_scales=self.quantization is not None and self.quantization.kv_cache_scales,
                tp=self.tp,
                head_method=head_method_for(self.config, self.quantization),
            )
        if source.kind == "dummy" or self.config.load.load_format == "dummy":
            self.model.init_dummy_weights(self.config.runtime.seed)
        else:  # each parameter's loader converts its tensors (an FP8 format quantizes floats as they load)
            gguf_blocks = self.quantization is not None and self.quantization.method == "gguf"
            runs_as = {
                "weights": self.weight_format,
                "dtype": str(self.dtype),
                "tp": [self.tp.rank, self.tp.size],
            }
            derived_cache.load_weights(
                self.model, iter_weights(source, gguf_blocks=gguf_blocks), source, runs_as
            )
        self.model.eval()
        self._apply_kv_scales()
        logger.info("loaded %s in %.1fs", source.name, time.perf_counter() - start)

    def _apply_kv_scales(self) -> None:
        """A checkpoint's k/v scales serve an FP8 cache; with a cache in the model dtype they do not apply."""
        scales = self.model.kv_scales()
        if scales is None:
            return
        if not is_fp8(self.kv_dtype):
            logger.info(
                "the checkpoint's KV-cache scales apply with kv_cache_dtype='fp8'; the cache is %s",
                self.kv_dtype,
            )
            return
        for attn, (k_scale, v_scale) in zip(self.model.attention_layers, scales):
            attn.use_kv_scales(k_scale, v_scale)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights as stored, with the scales of quantized ones: its state dict,
        each storage once (a tied head shares the embedding's)."""
        state = self.model.state_dict()
        return sum(
            {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}.values()
        )

    @property
    def weight_format(self) -> str:
        """The decoder layers' linear format, e.g. "bfloat16" or "fp8 (compressed-tensors)"."""
        if self.quantization is None:
            return str(self.dtype).removeprefix("torch.")
        return f"{self.quantization.method} ({self.quantization.source})"

    def _build_decode_graphs(self) -> DecodeGraphs:
        backend = self.model.attention_layers[0].backend
        assert isinstance(backend, GraphAttentionBackend)
        from tensorjet.runtime.cuda_graph import DecodeGraphs

        graphs = DecodeGraphs(
            self.model,
            backend,
            max_batch_size=self.config.scheduler.max_batch_size,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            max_seq_len=self.max_seq_len,
            device=self.device,
            cache_size=self.config.runtime.cuda_graph_cache_size,
        )
        graphs.capture_all()
        return graphs

    def _build_mixed_graphs(self) -> MixedStepGraphs:
        from tensorjet.runtime.cuda_graph import MixedStepGraphs

        graphs = MixedStepGraphs(
            self.model,
            self.model.attention_layers[0].backend,
            max_batch_size=self.config.scheduler.max_batch_size,
            max_num_tokens=self.config.scheduler.max_num_tokens,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            max_seq_len=self.max_seq_len,
            device=self.device,
        )
        graphs.capture_all(pool=self.decode_graphs.pool)  # one memory pool for all graphs
        return graphs

    def _build_verify_graphs(self) -> VerifyGraphs | None:
        rows = self.verify_rows_per_seq
        if not rows:
            return None
        from tensorjet.runtime.cuda_graph import VerifyGraphs

        graphs = VerifyGraphs(
            self.model,
            self.model.attention_layers[0].backend,
            max_batch_size=self.config.speculative_batch_size,
            rows_per_seq=rows,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            max_seq_len=self.max_seq_len,
            device=self.device,
        )
        graphs.capture_all(pool=self.decode_graphs.pool)
        return graphs

    def _select_attention_backend(self) -> str:
        choice = self.config.runtime.attention_backend
        if choice == "auto":
            choice = "triton" if self.device.type == "cuda" else "torch"
        invariant = self.config.runtime.batch_invariant
        if choice == "triton":
            from tensorjet.layers.triton_attention import TritonAttentionBackend

            backend = TritonAttentionBackend(batch_invariant=invariant)
        else:
            backend = RowwiseAttentionBackend() if invariant else TorchAttentionBackend()
        for attn in self.model.attention_layers:  # one backend shared by every layer
            attn.backend = backend
        select_kernels(self.model, self.config, choice)
        return choice

    # ---- KV cache sizing ---------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.kv_dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def kv_cache_blocks(self, bytes_per_block: int | None = None) -> int:
        """How many blocks the KV budget holds at `bytes_per_block` (default: this runner's; the sum of
        every runner sharing the block tables). On CUDA the budget is measured from this runner's
        profiling forward, so build every runner first. Under tensor parallelism every rank calls it (rank
        0 first tells the others to) and gets the fewest blocks any rank holds."""
        cache = self.config.cache
        if self.parallel is not None and self.tp.is_first:
            self.parallel.begin_start()
        with _explain_out_of_memory("sizing and allocating the KV cache"):
            if self.device.type == "cuda":
                budget = self._free_gpu_bytes_after_profile() * cache.kv_cache_free_gpu_mem_fraction
            else:
                budget = cache.cpu_kv_cache_bytes
        num_blocks = int(budget // (bytes_per_block or self.kv_bytes_per_block))
        if cache.kv_cache_max_tokens is not None:
            num_blocks = min(num_blocks, cache.kv_cache_max_tokens // self.block_size)
        if self.parallel is not None:  # one block table for all ranks: as many blocks as the fullest holds
            num_blocks = self.parallel.channel.min_over_ranks(num_blocks)
        if num_blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache after loading the model. {OUT_OF_MEMORY_ADVICE}"
            )
        return num_blocks

    def _free_gpu_bytes_after_profile(self) -> int:
        """Free memory once the model's peak activations at `max_num_tokens` are accounted for."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        n = self.config.scheduler.max_num_tokens
        blocks = -(-n // self.block_size)
        self._allocate_kv_cache(blocks)
        seq_meta = AttentionMetadata(
            query_lens=[n],
            context_lens=[n],
            slot_mapping=torch.arange(n, device=self.device),
            block_tables=torch.arange(blocks, device=self.device, dtype=torch.int32)[None],
            block_size=self.block_size,
        )
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(n, device=self.device), seq_meta)
            self.model.compute_logits(hidden[-self.config.scheduler.max_batch_size :])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        self._release_kv_cache()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        logger.info("profiled peak activation memory %.2f GiB at max_num_tokens=%d", peak / 2**30, n)
        return max(free - peak, 0)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def make_kv_cache_resident(self) -> None:
        """Write every page of a CPU KV cache once. `torch.empty` only reserves the pool; each page becomes
        the process's when a block first lands on it, so a long-running server's resident memory would
        creep up to the pool's size over hours of use. A server calls this at start to own the pool at
        once; short runs (`LLM`, `tensorjet generate`) never pay for pages they do not use. Device memory
        is the process's from its allocation: nothing to do there. Under tensor parallelism rank 0 has
        every rank do the same."""
        if self.device.type != "cpu":
            return
        if self.parallel is not None and self.tp.is_first:
            self.parallel.channel.send_make_kv_cache_resident()
        self.kv_cache.view(torch.uint8).zero_()

    def _release_kv_cache(self) -> None:
        for attn in self.model.attention_layers:
            attn.k_cache = attn.v_cache = torch.empty(0)
        del self.kv_cache

    # ---- one step ----------------------------------------------------------------------------
    def prepare(self, batch: StepBatch, prev: StepHandle | None = None) -> StepInputs:
        """The step's inputs on the device, moved there with one host-to-device copy.

        A sequence's last token may be pending (`last_token_pending`): `prev`, the step in flight,
        samples it, and its input id is taken from `prev.sampled.tokens` on the device."""
        bs = self.block_size
        values = StepValues()
        sampled_seq_ids: list[int] = []
        sampling_rows: list[SamplingRow] = []
        num_drafts: list[int] = []
        prompt_rows: list[int] = []
        prompt_seqs: list[StepSequence] = []
        for seq in batch.seqs:
            start, n, offset = seq.start, len(seq.token_ids), len(values.input_ids)
            end = start + n
            request = seq.prompt_logprobs
            if request is not None:
                first_row = offset + request.first - start
                prompt_rows += range(first_row, first_row + len(request.targets))
                prompt_seqs.append(seq)
            values.input_ids += seq.token_ids
            if seq.last_token_pending:
                if prev is None or seq.seq_id not in prev.row_of:
                    raise RuntimeError(f"sequence {seq.seq_id} has a pending token and no step in flight")
                values.fill_rows.append(offset + n - 1)
                values.fill_from.append(prev.row_of[seq.seq_id])
            values.positions += range(start, end)
            table = seq.block_table
            values.slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            values.block_tables.append(table)
            values.query_lens.append(n)
            values.context_lens.append(end)
            if seq.sampling is not None:
                m = seq.num_drafts
                sampled_seq_ids.append(seq.seq_id)
                sampling_rows.append(seq.sampling)
                num_drafts.append(m)
                if m:  # the row before each draft and the last row
                    values.logits_indices += range(offset + n - 1 - m, offset + n)
                    values.draft_rows += range(offset + n - m, offset + n)
                    if batch.drafts is not None:
                        values.draft_entries += batch.drafts.index[seq.seq_id][:m]
                else:
                    values.logits_indices.append(offset + n - 1)
        if self.parallel is not None:  # the other ranks run the same step from the same values
            self.parallel.channel.send_step(values, sampled_seq_ids, prompt_rows)
        return self._device_inputs(
            values, prev, batch.drafts, sampled_seq_ids, sampling_rows, num_drafts, prompt_rows, prompt_seqs
        )

    def _device_inputs(
        self,
        values: StepValues,
        prev: StepHandle | None,
        drafts: DeviceDrafts | None,
        sampled_seq_ids: list[int],
        sampling_rows: list[SamplingRow],
        num_drafts: list[int],
        prompt_rows: list[int],
        prompt_seqs: list[StepSequence],
    ) -> StepInputs:
        """Upload the step's values: into the buffer of the graph that will replay it, or into a fresh
        one for an eager step. Then take pending tokens and device drafts into its input ids."""
        graph = None if prompt_rows else self._graph_for(values)
        if graph is not None:
            graphs, size = graph
            parts = graphs.upload(size, values, self.upload)
            logits_t, meta = None, None
        else:
            parts = self._upload_packed(values)
            logits_t = parts["logits_indices"]
            meta = AttentionMetadata(
                query_lens=values.query_lens,
                context_lens=values.context_lens,
                slot_mapping=parts["slots"],
                block_tables=parts["block_tables"].view(values.num_seqs, -1),
                block_size=self.block_size,
            )
        ids_t = parts["input_ids"]  # a graph's: padded past the step's rows
        if prev is not None and values.fill_rows:
            ids_t[parts["fill_rows"]] = prev.sampled.tokens[parts["fill_from"]]
        if drafts is not None and values.draft_entries:
            ids_t[parts["draft_rows"]] = drafts.tokens[parts["draft_entries"]]
        if self.tp.size > 1 and (values.fill_rows or values.draft_entries):
            # Rank 0 sampled them (or its draft model did): its input ids are every rank's.
            self.tp.broadcast_from_first(ids_t)
        return StepInputs(
            input_ids=ids_t,
            positions=parts["positions"],
            graph=graph,
            meta=meta,
            logits_indices=logits_t,
            num_logits=len(values.logits_indices),
            sampled_seq_ids=sampled_seq_ids,
            sampling_rows=sampling_rows,
            num_drafts=num_drafts,
            draft_rows=parts.get("draft_rows"),  # a graph step's: only those it has
            draft_entries=parts.get("draft_entries"),
            drafts=drafts,
            prompt_rows=prompt_rows,
            prompt_seqs=prompt_seqs,
        )

    def _upload_packed(self, values: StepValues) -> dict[str, torch.Tensor]:
        """An eager step's values in a fresh device buffer, each part at exactly its length."""
        rows = values.num_rows
        host = {name: getattr(values, name) for name in StepValues.MESSAGE_PARTS}
        tables = host["block_tables"] = values.flat_block_tables()
        layout = Layout(
            [
                Part("input_ids", rows),
                Part("positions", rows),
                Part("slots", rows),
                Part("logits_indices", len(values.logits_indices)),
                *values.lookup_parts(),
                values.block_table_part(tables),
            ]
        )
        return layout.views(self.upload([layout], host))

    def _graph_for(self, values: StepValues) -> tuple[StepGraphs, int] | None:
        """The graph family and size that replays the step, if one holds it."""
        for graphs in (self.decode_graphs, self.verify_graphs, self.mixed_graphs):
            if graphs is not None and (size := graphs.size_for(values)) is not None:
                return graphs, size
        return None

    @torch.inference_mode()
    def launch(
        self, batch: StepBatch, prev: StepHandle | None = None, copy_to_host: bool = True
    ) -> StepHandle:
        """Queue the step on the device and return at once; the sampled tokens stay on the device.
        copy_to_host=False: nobody reads them on the host (a draft model's steps), so no copy is queued."""
        inputs = self.prepare(batch, prev)
        logits, prompt_logprobs = self._forward(inputs)
        sampled = None
        if logits is not None:
            bitmask = None if batch.token_bitmask is None else batch.token_bitmask()
            sampled = self._sample(logits, inputs, bitmask)
            if copy_to_host:
                sampled.start_copy()
        return StepHandle(inputs.sampled_seq_ids, sampled, prompt_logprobs)

    @torch.inference_mode()
    def run_worker_step(self, message: StepMessage) -> None:
        """Run rank 0's step on this rank (tensor parallelism): the same inputs, the same forward, no
        sampling (so none of what only sampling reads: rows, drafts' distributions, prompt requests)."""
        inputs = self._device_inputs(
            message.values, None, None, message.sampled_seq_ids, [], [], message.prompt_rows, []
        )
        self._forward(inputs)

    def _forward(self, inputs: StepInputs) -> tuple[torch.Tensor | None, PendingPromptLogprobs | None]:
        """The step's logits of its sampled rows (None where it samples none, or on a rank other than
        0), and its prompt logprobs."""
        if inputs.graph is not None:
            graphs, size = inputs.graph
            if graphs is self.decode_graphs:
                self.num_graph_steps += 1
            elif graphs is self.verify_graphs:
                self.num_verify_graph_steps += 1
            else:
                self.num_mixed_graph_steps += 1
            return graphs.replay(size, inputs.num_logits), None
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        prompt_logprobs = None
        if inputs.prompt_rows:
            prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        logits = None
        if inputs.sampled_seq_ids:
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits, prompt_logprobs

    def _sample(
        self, logits: torch.Tensor, inputs: StepInputs, bitmask: TokenBitmask | None = None
    ) -> SampledTokens | VerifiedTokens:
        if not inputs.verifies:
            return self.sampler.sample(logits, inputs.sampling_rows, keep_probs=self.draft, bitmask=bitmask)
        drafts = inputs.drafts
        draft_probs = None
        if drafts is not None and drafts.probs is not None:
            draft_probs = drafts.probs[inputs.draft_entries]
        draft_tokens = inputs.input_ids[inputs.draft_rows]
        return self.verifier.verify(
            logits, inputs.sampling_rows, inputs.num_drafts, draft_tokens, draft_probs, bitmask
        )

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> PendingPromptLogprobs | None:
        """Logprobs of the prompt tokens that the step's rows predict; they stay on the device."""
        requests = [seq.prompt_logprobs for seq in inputs.prompt_seqs]
        rows = torch.tensor(inputs.prompt_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        if logits is None:  # a rank other than 0: rank 0 has the logits
            return None
        logprobs = logits.log_softmax(-1)
        targets = list(chain.from_iterable(r.targets for r in requests))
        chosen = logprobs.gather(1, torch.tensor(targets, device=self.device)[:, None])[:, 0]
        top_values, top_ids = logprobs.topk(max(max(r.top for r in requests), 1), dim=-1)
        return PendingPromptLogprobs(
            seq_ids=[seq.seq_id for seq in inputs.prompt_seqs],
            counts=[len(r.targets) for r in requests],
            tops=[r.top for r in requests],
            targets=targets,
            chosen=chosen,
            top_values=top_values,
            top_ids=top_ids,
        )
