"""The engine's own model run one decoder layer at a time over the calibration samples.

The model lives in host memory; the layer being calibrated moves to the device and back, so a model
larger than the device's memory calibrates as long as one layer and the samples' hidden states fit.
The samples run in chunks of whole sequences, each a batch of fresh prompts for the attention layers
(PyTorch's attention over their own keys; nothing is written to a KV cache: every slot is -1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tensorjet.layers.attention import AttentionMetadata
from tensorjet.models.llama import LlamaDecoderLayer, LlamaForCausalLM

DEFAULT_CHUNK_TOKENS = 8192  # tokens per forward call: bounds the activations of one call


@dataclass
class Chunk:
    """Some whole samples, flattened: their positions, attention metadata, and the residual stream
    entering the current layer [tokens, hidden]."""

    positions: torch.Tensor
    meta: AttentionMetadata
    hidden: torch.Tensor


class LayerwiseRunner:
    """Feeds `token_ids` [samples, seq_len] through `model`'s decoder layers, one layer at a time."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        token_ids: torch.Tensor,
        device: torch.device,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        self.model = model
        self.device = device
        num_samples, seq_len = token_ids.shape
        per_chunk = max(1, chunk_tokens // seq_len)
        self.chunks: list[Chunk] = []
        embed = model.embed_tokens
        for start in range(0, num_samples, per_chunk):
            ids = token_ids[start : start + per_chunk]
            with torch.no_grad():
                hidden = embed(ids.reshape(-1).to(embed.weight.device)).to(device)
            self.chunks.append(
                Chunk(
                    _positions(ids.shape[0], seq_len, device),
                    _metadata(ids.shape[0], seq_len, device),
                    hidden,
                )
            )

    @property
    def num_tokens(self) -> int:
        return sum(c.hidden.shape[0] for c in self.chunks)

    @contextlib.contextmanager
    def on_device(self, index: int) -> Iterator[LlamaDecoderLayer]:
        """Layer `index` on the device for the duration (with an empty KV cache to attend without)."""
        layer = self.model.layers[index]
        home = layer.input_layernorm.weight.device
        layer.to(self.device)
        attn = layer.self_attn.attn
        scratch = torch.empty(
            0,
            1,
            attn.num_kv_heads,
            attn.head_dim,
            device=self.device,
            dtype=layer.input_layernorm.weight.dtype,
        )
        attn.k_cache, attn.v_cache = scratch, scratch
        try:
            yield layer
        finally:
            attn.k_cache, attn.v_cache = torch.empty(0), torch.empty(0)
            layer.to(home)

    @torch.no_grad()
    def forward(
        self,
        layer: LlamaDecoderLayer,
        inputs_of: dict[nn.Module, Callable[[int, torch.Tensor], None]] | None = None,
        outputs_of: dict[nn.Module, Callable[[int, torch.Tensor], None]] | None = None,
    ) -> list[torch.Tensor]:
        """The residual stream after `layer`, per chunk. `inputs_of[module](chunk, x)` sees each of the
        module's inputs while it runs, `outputs_of[module](chunk, y)` each of its outputs."""
        handles = []
        current = [0]
        for module, see in (inputs_of or {}).items():
            handles.append(
                module.register_forward_pre_hook(lambda m, args, see=see: see(current[0], args[0]))
            )
        for module, see in (outputs_of or {}).items():
            handles.append(module.register_forward_hook(lambda m, args, out, see=see: see(current[0], out)))
        try:
            results = []
            for i, chunk in enumerate(self.chunks):
                current[0] = i
                x, residual = layer(chunk.positions, chunk.hidden, None, chunk.meta)
                results.append(x + residual)
            return results
        finally:
            for handle in handles:
                handle.remove()

    def advance(self, hidden: list[torch.Tensor]) -> None:
        """The next layer's inputs: `hidden` (one per chunk, from `forward`)."""
        for chunk, h in zip(self.chunks, hidden):
            chunk.hidden = h


def _positions(num_samples: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(seq_len, device=device).repeat(num_samples)


def _metadata(num_samples: int, seq_len: int, device: torch.device) -> AttentionMetadata:
    """Fresh prompts of `seq_len` tokens that store nothing (slot -1) and attend to their own keys."""
    return AttentionMetadata(
        query_lens=[seq_len] * num_samples,
        context_lens=[seq_len] * num_samples,
        slot_mapping=torch.full((num_samples * seq_len,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(num_samples, 1, dtype=torch.int32, device=device),
        block_size=1,
    )
