"""Runs the model for one scheduled step: builds device inputs, owns the KV cache, samples.

The runner knows nothing about requests or policies; it gets sequences with how many new tokens
each computes this step, and returns one sampled token for each sequence whose slice reaches the
end of its known tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tensorjet.config import EngineConfig
from tensorjet.engine.sequence import Sequence
from tensorjet.layers.attention import AttentionMetadata
from tensorjet.models.llama import LlamaForCausalLM, head_dim_of
from tensorjet.models.loader import ModelSource, iter_weights
from tensorjet.runtime.sampler import Sampler, SamplerOutput, SamplingRow

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flattened step whose logits are sampled
    sampling_seqs: list[Sequence]
    # Prompt logprobs: flattened rows, the prompt token each row predicts, and whose it is.
    prompt_rows: list[int]
    prompt_targets: list[int]
    prompt_seqs: list[Sequence]


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, eos_token_ids: set[int]) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.cache.block_size
        self.eos_token_ids = eos_token_ids
        hf_config = source.hf_config
        start = time.perf_counter()
        with torch.device(self.device):
            self.model = LlamaForCausalLM(hf_config, self.dtype)
        if source.kind == "dummy" or config.load_format == "dummy":
            self.model.init_dummy_weights(config.seed)
        else:
            self.model.load_weights((name, t.to(self.dtype)) for name, t in iter_weights(source))
        self.model.eval()
        self.attention_backend = self._select_attention_backend()
        if self.device.type == "cuda" and config.enable_cuda_graph:
            logger.warning("enable_cuda_graph: CUDA-graph capture is not built yet; decode runs eagerly")
        logger.info("loaded %s in %.1fs", source.name, time.perf_counter() - start)
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        self.head_dim = head_dim_of(hf_config)
        self.num_layers = hf_config.num_hidden_layers
        self.num_blocks = self._kv_cache_blocks()
        self._allocate_kv_cache(self.num_blocks)
        self.sampler = Sampler(config.seed)

    def _select_attention_backend(self) -> str:
        choice = self.config.attention_backend
        if choice == "auto":
            choice = "triton" if self.device.type == "cuda" else "torch"
        if choice == "triton":
            from tensorjet.kernels.backend import TritonAttentionBackend

            backend = TritonAttentionBackend()
            for attn in self.model.attention_layers:
                attn.backend = backend
        return choice

    # ---- KV cache sizing ---------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
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
                "no GPU memory left for the KV cache after loading the model: lower max_num_tokens or "
                "max_batch_size, raise kv_cache_free_gpu_mem_fraction, or use a smaller/quantized model"
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
        self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def _release_kv_cache(self) -> None:
        for attn in self.model.attention_layers:
            attn.k_cache = attn.v_cache = torch.empty(0)
        del self.kv_cache

    # ---- one step ----------------------------------------------------------------------------
    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        context_lens: list[int] = []
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
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            context_lens.append(end)
            if end == len(seq):
                logits_indices.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [-1] * (max_blocks - len(s.block_table)) for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            query_lens=list(num_new_tokens),
            context_lens=context_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            block_size=bs,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=dev),
            sampling_seqs=sampling_seqs,
            prompt_rows=prompt_rows,
            prompt_targets=prompt_targets,
            prompt_seqs=prompt_seqs,
        )

    @torch.inference_mode()
    def execute(
        self, seqs: list[Sequence], num_new_tokens: list[int]
    ) -> tuple[list[Sequence], SamplerOutput]:
        """Compute the scheduled tokens; sample for the sequences whose slice completed them."""
        inputs = self.prepare(seqs, num_new_tokens)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        if inputs.prompt_rows:
            self._record_prompt_logprobs(hidden, inputs)
        if not inputs.sampling_seqs:
            return [], SamplerOutput(token_ids=[], logprobs=[])
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        rows = [self._sampling_row(seq) for seq in inputs.sampling_seqs]
        return inputs.sampling_seqs, self.sampler(logits, rows)

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
        return SamplingRow(
            params=params,
            generator=seq.generator,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            output_token_ids=seq.output_token_ids,
            banned_token_ids=banned,
        )
