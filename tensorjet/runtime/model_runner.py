"""Runs the model for one scheduled step: builds device inputs, owns the KV cache, samples.

The runner knows nothing about requests, sequences or policies: it gets a `StepBatch` (plain data,
`tensorjet.runtime.step`) and returns a `StepHandle` whose result holds the tokens sampled for the
sequences that asked for one.

Under tensor parallelism (`parallel`) a runner runs in every rank's process with its rank's share of the
weights and KV heads. Rank 0's `prepare` sends each step's values to the others (`StepChannel`), which
run it with `run_worker_step`; only rank 0 samples.
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
from tensorjet.layers.attention import AttentionMetadata, GraphAttentionBackend
from tensorjet.layers.batch_invariant import RowwiseAttentionBackend
from tensorjet.models.llama import LlamaForCausalLM, head_dim_of
from tensorjet.models.loader import ModelSource, iter_weights
from tensorjet.quant.formats import quantization_spec
from tensorjet.runtime.device_io import to_device
from tensorjet.runtime.kernel_selection import linear_method_for, select_kernels
from tensorjet.runtime.sampler import Sampler, SamplingRow
from tensorjet.runtime.step import PendingPromptLogprobs, StepBatch, StepHandle, StepSequence

if TYPE_CHECKING:
    from tensorjet.runtime.cuda_graph import DecodeGraphs, MixedStepGraphs
    from tensorjet.runtime.parallel import ParallelGroup
    from tensorjet.runtime.step_channel import StepMessage

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """A step on the device, flattened over its sequences' query rows."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata  # its context_lens_tensor: [num_seqs] int64, cached prefix + new tokens
    logits_indices: torch.Tensor  # rows of the flattened step whose logits are sampled
    sampled_seq_ids: list[int]  # whose they are
    sampling_rows: list[SamplingRow]
    prompt_rows: list[int]  # rows whose prompt logprobs are reported ...
    prompt_seqs: list[StepSequence]  # ... for these sequences' requests, in order


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
    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        max_seq_len: int,
        parallel: ParallelGroup | None = None,
    ) -> None:
        self.config = config
        self.parallel = parallel  # this rank's place among the tensor-parallel ranks; None: one process
        self.tp = SINGLE if parallel is None else parallel.tp
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_cache_torch_dtype
        self.block_size = config.cache.block_size
        self.max_seq_len = max_seq_len
        hf_config = source.hf_config
        self.head_dim = head_dim_of(hf_config)
        self.num_layers = hf_config.num_hidden_layers
        self.sampler = Sampler(config.runtime.seed)
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedStepGraphs | None = None
        self.num_graph_steps = 0  # steps replayed from a decode graph
        self.num_mixed_graph_steps = 0  # steps with prompt tokens replayed from a mixed-step graph
        with _explain_out_of_memory("loading the model weights"):
            self._load_model(source)
        if parallel is not None:  # every rank has its weights: the device collectives start together
            parallel.channel.barrier()
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads  # this rank's (tensor parallelism)
        self.attention_backend = self._select_attention_backend()
        with _explain_out_of_memory("sizing and allocating the KV cache"):
            self.num_blocks = self._kv_cache_blocks()
            self._allocate_kv_cache(self.num_blocks)
        if config.uses_step_graphs(self.attention_backend):
            with _explain_out_of_memory("capturing CUDA graphs"):
                self.decode_graphs = self._build_decode_graphs()
                self.mixed_graphs = self._build_mixed_graphs()

    # ---- tensor parallelism: the other ranks ----------------------------------------------------
    def watch_workers(self, on_failure: Callable[[str], None]) -> None:
        """Call `on_failure(reason)` once, from a watchdog thread, if another rank's process goes away.
        Nothing to watch in one process."""
        if self.parallel is not None and self.parallel.workers is not None:
            self.parallel.workers.watch(on_failure)

    def worker_failure(self) -> str | None:
        """Why another rank's process is gone, or None (all run, or there are none)."""
        if self.parallel is None or self.parallel.workers is None:
            return None
        return self.parallel.workers.failure()

    def shutdown(self) -> None:
        """Stop the other ranks' processes and leave their process group (nothing in one process)."""
        if self.parallel is not None:
            self.parallel.shutdown()

    def _load_model(self, source: ModelSource) -> None:
        start = time.perf_counter()
        self.quantization = quantization_spec(
            self.config.quantization, source.quantization_config, dummy=source.kind == "dummy"
        )
        with torch.device(self.device):
            self.model = LlamaForCausalLM(
                source.hf_config,
                self.dtype,
                linear_method=linear_method_for(self.config, self.quantization),
                kv_cache_scales=self.quantization is not None and self.quantization.kv_cache_scales,
                tp=self.tp,
            )
        if source.kind == "dummy" or self.config.load.load_format == "dummy":
            self.model.init_dummy_weights(self.config.runtime.seed)
        else:  # each parameter's loader converts its tensors (an FP8 format quantizes floats as they load)
            self.model.load_weights(iter_weights(source))
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

    def _select_attention_backend(self) -> str:
        choice = self.config.runtime.attention_backend
        if choice == "auto":
            choice = "triton" if self.device.type == "cuda" else "torch"
        invariant = self.config.runtime.batch_invariant
        backend = None
        if choice == "triton":
            from tensorjet.layers.triton_attention import TritonAttentionBackend

            backend = TritonAttentionBackend(batch_invariant=invariant)
        elif invariant:
            backend = RowwiseAttentionBackend()
        if backend is not None:  # one backend shared by every layer
            for attn in self.model.attention_layers:
                attn.backend = backend
        select_kernels(self.model, self.config, choice)
        return choice

    # ---- KV cache sizing ---------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.kv_dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _kv_cache_blocks(self) -> int:
        cache = self.config.cache
        if self.device.type == "cuda":
            budget = self._free_gpu_bytes_after_profile() * cache.kv_cache_free_gpu_mem_fraction
        else:
            budget = cache.cpu_kv_cache_bytes
        num_blocks = int(budget // self.kv_bytes_per_block)
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

    def _release_kv_cache(self) -> None:
        for attn in self.model.attention_layers:
            attn.k_cache = attn.v_cache = torch.empty(0)
        del self.kv_cache

    # ---- one step ----------------------------------------------------------------------------
    def prepare(self, batch: StepBatch, prev: StepHandle | None = None) -> StepInputs:
        """Flatten the step's tokens into device tensors with one host-to-device copy.

        A sequence's last token may be pending (`last_token_pending`): `prev`, the step in flight,
        samples it, and its input id is taken from `prev.sampled.tokens` on the device."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_indices: list[int] = []
        sampled_seq_ids: list[int] = []
        sampling_rows: list[SamplingRow] = []
        fill_rows: list[int] = []  # input rows whose token is still on the device ...
        fill_from: list[int] = []  # ... at this index of prev's sampled tokens
        prompt_rows: list[int] = []
        prompt_seqs: list[StepSequence] = []
        for seq in batch.seqs:
            start, n, offset = seq.start, len(seq.token_ids), len(input_ids)
            end = start + n
            request = seq.prompt_logprobs
            if request is not None:
                first_row = offset + request.first - start
                prompt_rows += range(first_row, first_row + len(request.targets))
                prompt_seqs.append(seq)
            input_ids += seq.token_ids
            if seq.last_token_pending:
                if prev is None or seq.seq_id not in prev.row_of:
                    raise RuntimeError(f"sequence {seq.seq_id} has a pending token and no step in flight")
                fill_rows.append(offset + n - 1)
                fill_from.append(prev.row_of[seq.seq_id])
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(n)
            context_lens.append(end)
            if seq.sampling is not None:
                logits_indices.append(offset + n - 1)
                sampled_seq_ids.append(seq.seq_id)
                sampling_rows.append(seq.sampling)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables: list[int] = []
        for s in batch.seqs:
            tables += s.block_table + [-1] * (max_blocks - len(s.block_table))
        parts = (input_ids, positions, slots, logits_indices, context_lens, fill_rows, fill_from, tables)
        # One copy for all of them; each part padded to 16 bytes so the kernels see aligned pointers
        # (Triton compiles a variant per pointer alignment).
        padded = [p + [0] * (len(p) % 2) for p in parts]
        values = list(chain.from_iterable(padded))
        if self.parallel is not None:  # the other ranks run the same step from the same values
            self.parallel.channel.send_step(
                query_lens, sampled_seq_ids, prompt_rows, len(fill_rows), max_blocks, values
            )
        flat = to_device(values, torch.long, self.device)
        return self._step_inputs(
            flat, [len(p) for p in parts], query_lens, context_lens, max_blocks, prev, sampled_seq_ids,
            sampling_rows, prompt_rows, prompt_seqs,
        )  # fmt: skip

    def _step_inputs(
        self,
        flat: torch.Tensor,
        lengths: list[int],
        query_lens: list[int],
        context_lens: list[int],
        max_blocks: int,
        prev: StepHandle | None,
        sampled_seq_ids: list[int],
        sampling_rows: list[SamplingRow],
        prompt_rows: list[int],
        prompt_seqs: list[StepSequence],
    ) -> StepInputs:
        """The step's device tensors from `prepare`'s values, on the device as `flat`."""
        (ids_t, pos_t, slots_t, logits_t, ctx_t, fill_rows_t, fill_from_t, tables_t) = (
            chunk[:n] for chunk, n in zip(flat.split([n + n % 2 for n in lengths]), lengths)
        )
        if lengths[5]:  # pending tokens
            if prev is not None:
                ids_t[fill_rows_t] = prev.sampled.tokens[fill_from_t]
            if self.tp.size > 1:  # rank 0 sampled them: its input ids are every rank's
                self.tp.broadcast_from_first(ids_t)
        meta = AttentionMetadata(
            query_lens=query_lens,
            context_lens=context_lens,
            slot_mapping=slots_t,
            block_tables=tables_t.view(len(query_lens), max_blocks).to(torch.int32),
            block_size=self.block_size,
            context_lens_tensor=ctx_t,
        )
        return StepInputs(
            input_ids=ids_t,
            positions=pos_t,
            meta=meta,
            logits_indices=logits_t,
            sampled_seq_ids=sampled_seq_ids,
            sampling_rows=sampling_rows,
            prompt_rows=prompt_rows,
            prompt_seqs=prompt_seqs,
        )

    @torch.inference_mode()
    def launch(self, batch: StepBatch, prev: StepHandle | None = None) -> StepHandle:
        """Queue the step on the device and return at once; the sampled tokens stay on the device."""
        inputs = self.prepare(batch, prev)
        logits, prompt_logprobs = self._forward(inputs)
        sampled = None
        if logits is not None:
            sampled = self.sampler.sample(logits, inputs.sampling_rows)
            sampled.start_copy()
        return StepHandle(inputs.sampled_seq_ids, sampled, prompt_logprobs)

    @torch.inference_mode()
    def run_worker_step(self, message: StepMessage) -> None:
        """Run rank 0's step on this rank (tensor parallelism): the same inputs, the same forward, no
        sampling."""
        lengths = message.part_lengths
        ctx_start = sum(n + n % 2 for n in lengths[:4])
        context_lens = message.values[ctx_start : ctx_start + lengths[4]].tolist()
        flat = message.values
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        inputs = self._step_inputs(
            flat, lengths, message.query_lens, context_lens, message.max_blocks, None,
            message.sampled_seq_ids, [], message.prompt_rows, [],
        )  # fmt: skip
        self._forward(inputs)

    def _forward(self, inputs: StepInputs) -> tuple[torch.Tensor | None, PendingPromptLogprobs | None]:
        """The step's logits of its sampled rows (None where it samples none, or on a rank other than
        0), and its prompt logprobs."""
        prompt_logprobs = None
        if self._use_decode_graph(inputs):
            self.num_graph_steps += 1
            logits = self.decode_graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        elif self._use_mixed_graph(inputs):
            self.num_mixed_graph_steps += 1
            logits = self.mixed_graphs.run(
                inputs.input_ids, inputs.positions, inputs.logits_indices, inputs.meta
            )
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
            if inputs.prompt_rows:
                prompt_logprobs = self._prompt_logprobs(hidden, inputs)
            logits = None
            if inputs.sampled_seq_ids:
                logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits, prompt_logprobs

    def _use_decode_graph(self, inputs: StepInputs) -> bool:
        num_seqs = inputs.meta.num_seqs
        return (
            self.decode_graphs is not None
            and num_seqs <= self.decode_graphs.max_batch_size
            and not inputs.prompt_rows
            and inputs.input_ids.shape[0] == num_seqs  # one query row each
        )

    def _use_mixed_graph(self, inputs: StepInputs) -> bool:
        return (
            self.mixed_graphs is not None
            and bool(inputs.sampled_seq_ids)  # one sampling nothing (early prompt chunks only) runs eagerly
            and not inputs.prompt_rows
            and self.mixed_graphs.fits(inputs.meta.query_lens)
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
