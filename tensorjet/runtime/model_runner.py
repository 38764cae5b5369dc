"""Runs the model for one scheduled step: builds device inputs, owns the KV cache, samples.

The runner knows nothing about requests or policies; it gets sequences with how many new tokens
each computes this step, and returns one sampled token for each sequence whose slice reaches the
end of its known tokens.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import torch

from tensorjet.config import EngineConfig
from tensorjet.engine.sequence import PLACEHOLDER, Sequence
from tensorjet.layers.attention import AttentionMetadata
from tensorjet.models.llama import LlamaForCausalLM, head_dim_of
from tensorjet.models.loader import ModelSource, iter_weights
from tensorjet.runtime.device_io import to_device
from tensorjet.runtime.kernel_selection import linear_method_for, select_kernels
from tensorjet.runtime.sampler import SampledTokens, Sampler, SamplerOutput, SamplingRow

if TYPE_CHECKING:
    from tensorjet.runtime.cuda_graph import DecodeGraphs, MixedStepGraphs

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    context_lens: torch.Tensor  # [num_seqs] int64, cached prefix + new tokens
    logits_indices: torch.Tensor  # rows of the flattened step whose logits are sampled
    sampling_seqs: list[Sequence]
    # Prompt logprobs: flattened rows, the prompt token each row predicts, and whose it is.
    prompt_rows: list[int]
    prompt_targets: list[int]
    prompt_seqs: list[Sequence]


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


class StepHandle:
    """A launched step: which sequences it samples for and their tokens, still on the device."""

    def __init__(self, sampling_seqs: list[Sequence], sampled: SampledTokens | None) -> None:
        self.sampling_seqs = sampling_seqs
        self.sampled = sampled
        self.row_of = {seq.seq_id: i for i, seq in enumerate(sampling_seqs)}
        self.token_index: list[int] = []  # where each sampled token goes in its sequence (engine's)

    def result(self) -> SamplerOutput:
        """Wait for the step and return its sampled tokens (and logprobs) on the host."""
        if self.sampled is None:
            return SamplerOutput(token_ids=[], logprobs=[])
        return self.sampled.to_host()


class ModelRunner:
    def __init__(
        self, config: EngineConfig, source: ModelSource, eos_token_ids: set[int], max_seq_len: int
    ) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.kv_dtype = config.kv_cache_torch_dtype
        self.block_size = config.cache.block_size
        self.eos_token_ids = eos_token_ids
        self.max_seq_len = max_seq_len
        hf_config = source.hf_config
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        self.head_dim = head_dim_of(hf_config)
        self.num_layers = hf_config.num_hidden_layers
        self.sampler = Sampler(config.seed)
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedStepGraphs | None = None
        self.num_graph_steps = 0  # steps replayed from a decode graph
        self.num_mixed_graph_steps = 0  # steps with prompt tokens replayed from a mixed-step graph
        with _explain_out_of_memory("loading the model weights"):
            self._load_model(source)
        self.attention_backend = self._select_attention_backend()
        with _explain_out_of_memory("sizing and allocating the KV cache"):
            self.num_blocks = self._kv_cache_blocks()
            self._allocate_kv_cache(self.num_blocks)
        if config.enable_cuda_graph:
            with _explain_out_of_memory("capturing CUDA graphs"):
                self.decode_graphs = self._build_decode_graphs()
                self.mixed_graphs = self._build_mixed_graphs()

    def _load_model(self, source: ModelSource) -> None:
        start = time.perf_counter()
        with torch.device(self.device):
            self.model = LlamaForCausalLM(
                source.hf_config, self.dtype, linear_method=linear_method_for(self.config)
            )
        if source.kind == "dummy" or self.config.load_format == "dummy":
            self.model.init_dummy_weights(self.config.seed)
        else:
            self.model.load_weights((name, t.to(self.dtype)) for name, t in iter_weights(source))
        self.model.eval()
        logger.info("loaded %s in %.1fs", source.name, time.perf_counter() - start)

    def _build_decode_graphs(self) -> DecodeGraphs | None:
        if self.attention_backend != "triton":
            if self.device.type == "cuda":
                logger.warning("enable_cuda_graph needs attention_backend='triton'; decode runs eagerly")
            return None  # on CPU the reference backend runs eagerly, as it should
        from tensorjet.runtime.cuda_graph import DecodeGraphs

        graphs = DecodeGraphs(
            self.model,
            max_batch_size=self.config.max_batch_size,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            max_seq_len=self.max_seq_len,
            device=self.device,
            cache_size=self.config.cuda_graph_cache_size,
        )
        graphs.capture_all()
        return graphs

    def _build_mixed_graphs(self) -> MixedStepGraphs | None:
        if self.decode_graphs is None:
            return None
        from tensorjet.runtime.cuda_graph import MixedStepGraphs

        graphs = MixedStepGraphs(
            self.model,
            self.model.attention_layers[0].backend,
            max_batch_size=self.config.max_batch_size,
            max_num_tokens=self.config.max_num_tokens,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            max_seq_len=self.max_seq_len,
            device=self.device,
        )
        graphs.capture_all(pool=self.decode_graphs.pool)  # one memory pool for all graphs
        return graphs

    def _select_attention_backend(self) -> str:
        choice = self.config.attention_backend
        if choice == "auto":
            choice = "triton" if self.device.type == "cuda" else "torch"
        if choice == "triton":
            from tensorjet.kernels.backend import TritonAttentionBackend

            backend = TritonAttentionBackend()
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
        n = self.config.max_num_tokens
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
            self.model.compute_logits(hidden[-self.config.max_batch_size :])
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
    def prepare(
        self, seqs: list[Sequence], num_new_tokens: list[int], prev: StepHandle | None = None
    ) -> StepInputs:
        """Flatten the step's tokens into device tensors with one host-to-device copy.

        A sequence's last token may still be a PLACEHOLDER for what `prev` (the step in flight)
        samples: its input id is then taken from `prev.sampled.tokens` on the device."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        context_lens: list[int] = []
        fill_rows: list[int] = []  # input rows whose token is still on the device ...
        fill_from: list[int] = []  # ... at this index of prev's sampled tokens
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_seqs: list[Sequence] = []
        for seq, n in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            if seq.wants_prompt_logprobs:
                # Row p predicts prompt token p + 1; skip positions recorded before a preemption.
                for p in range(max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)):
                    prompt_rows.append(len(input_ids) + p - start)
                    prompt_targets.append(seq.token_ids[p + 1])
                    prompt_seqs.append(seq)
            input_ids += seq.token_ids[start:end]
            if input_ids[-1] == PLACEHOLDER:
                if prev is None or seq.seq_id not in prev.row_of:
                    raise RuntimeError(f"sequence {seq.seq_id} has an unresolved token and no step in flight")
                input_ids[-1] = 0
                fill_rows.append(len(input_ids) - 1)
                fill_from.append(prev.row_of[seq.seq_id])
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            context_lens.append(end)
            if end == len(seq):
                logits_indices.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables: list[int] = []
        for s in seqs:
            tables += s.block_table + [-1] * (max_blocks - len(s.block_table))
        parts = (input_ids, positions, slots, logits_indices, context_lens, fill_rows, fill_from, tables)
        # One copy for all of them; each part padded to 16 bytes so the kernels see aligned pointers
        # (Triton compiles a variant per pointer alignment).
        padded = [p + [0] * (len(p) % 2) for p in parts]
        flat = to_device(list(chain.from_iterable(padded)), torch.long, self.device)
        (ids_t, pos_t, slots_t, logits_t, ctx_t, fill_rows_t, fill_from_t, tables_t) = (
            chunk[: len(p)] for chunk, p in zip(flat.split([len(p) for p in padded]), parts)
        )
        if fill_rows:
            ids_t[fill_rows_t] = prev.sampled.tokens[fill_from_t]
        meta = AttentionMetadata(
            query_lens=list(num_new_tokens),
            context_lens=context_lens,
            slot_mapping=slots_t,
            block_tables=tables_t.view(len(seqs), max_blocks).to(torch.int32),
            block_size=bs,
        )
        return StepInputs(
            input_ids=ids_t,
            positions=pos_t,
            meta=meta,
            context_lens=ctx_t,
            logits_indices=logits_t,
            sampling_seqs=sampling_seqs,
            prompt_rows=prompt_rows,
            prompt_targets=prompt_targets,
            prompt_seqs=prompt_seqs,
        )

    @torch.inference_mode()
    def launch(
        self, seqs: list[Sequence], num_new_tokens: list[int], prev: StepHandle | None = None
    ) -> StepHandle:
        """Queue the step on the device and return at once; the sampled tokens stay on the device.

        Sequences whose slice reaches the end of their tokens are sampled (`handle.sampling_seqs`)."""
        inputs = self.prepare(seqs, num_new_tokens, prev)
        if self._use_graph(inputs, num_new_tokens):
            self.num_graph_steps += 1
            logits = self.decode_graphs.run(
                inputs.input_ids,
                inputs.positions,
                inputs.meta.slot_mapping,
                inputs.meta.block_tables,
                inputs.context_lens,
            )
        elif self._use_mixed_graph(inputs, num_new_tokens):
            self.num_mixed_graph_steps += 1
            logits = self.mixed_graphs.run(
                inputs.input_ids, inputs.positions, inputs.logits_indices, inputs.meta
            )
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
            if inputs.prompt_rows:
                self._record_prompt_logprobs(hidden, inputs)
            logits = None
            if inputs.sampling_seqs:
                logits = self.model.compute_logits(hidden[inputs.logits_indices])
        sampled = None
        if logits is not None:
            rows = [self._sampling_row(seq) for seq in inputs.sampling_seqs]
            sampled = self.sampler.sample(logits, rows)
            sampled.start_copy()
        return StepHandle(inputs.sampling_seqs, sampled)

    def _use_graph(self, inputs: StepInputs, num_new_tokens: list[int]) -> bool:
        return (
            self.decode_graphs is not None
            and len(num_new_tokens) <= self.decode_graphs.max_batch_size
            and not inputs.prompt_rows
            and all(n == 1 for n in num_new_tokens)
        )

    def _use_mixed_graph(self, inputs: StepInputs, num_new_tokens: list[int]) -> bool:
        return (
            self.mixed_graphs is not None
            and bool(inputs.sampling_seqs)  # one that samples nothing (only early prompt chunks) runs eagerly
            and not inputs.prompt_rows
            and self.mixed_graphs.fits(num_new_tokens)
        )

    def _record_prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> None:
        rows = torch.tensor(inputs.prompt_rows, device=self.device)
        logprobs = self.model.compute_logits(hidden[rows]).log_softmax(-1)
        targets = torch.tensor(inputs.prompt_targets, device=self.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        k = max(s.params.prompt_logprobs for s in inputs.prompt_seqs)
        top_lp, top_ids = logprobs.topk(max(k, 1), dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for i, (seq, target) in enumerate(zip(inputs.prompt_seqs, inputs.prompt_targets)):
            n = seq.params.prompt_logprobs
            entry = dict(zip(top_ids[i][:n], top_lp[i][:n]))
            entry[target] = chosen[i]
            seq.prompt_logprobs.append(entry)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(self.eos_token_ids))
        history = params.needs_token_history  # copying every context each step is O(context)
        return SamplingRow(
            params=params,
            generator=seq.generator,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens] if history else [],
            output_token_ids=seq.output_token_ids if history else [],
            banned_token_ids=banned,
        )
