"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Input is one step's tokens flattened across sequences ([num_tokens]); attention metadata says which
tokens belong to which sequence. Weights load from HF-named tensors into merged q|k|v and gate|up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from transformers import PretrainedConfig

from tensorjet.layers.activation import silu_and_mul
from tensorjet.layers.attention import Attention, AttentionMetadata
from tensorjet.layers.linear import Linear, onednn_linear
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# What one kernel fused away at batch 1 saves: its run time plus its launch gap in a CUDA graph
# (~1.5-2 + ~1 us for a norm or SiLU on the H200; `benchmarks/profile_kernels.py`).
FUSED_LAUNCH_US = 2.5


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def max_positions_of(config: PretrainedConfig) -> int:
    return int(getattr(config, "max_position_embeddings", 4096))


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(
            q_size, config.hidden_size, bias=bool(getattr(config, "attention_bias", False)), dtype=dtype
        )
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, rotary)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(x), meta))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention from the q|k|v projection's output to the o projection's input, [T, q_size]."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attn(positions, q, k, v, meta).reshape(-1, self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inter = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], bias=bias, dtype=dtype)
        self.down_proj = Linear(inter, config.hidden_size, bias=bias, dtype=dtype)
        self.act = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, dtype)
        self.mlp = LlamaMLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def fused_projections(self) -> dict[str, tuple[Linear, dict]]:
        """The projections `forward_fused` runs, each with what it fuses in (`fused_gemv` options)."""
        return {
            "qkv_proj": (self.self_attn.qkv_proj, dict(norm=True)),
            "o_proj": (self.self_attn.o_proj, dict(residual=True)),
            "gate_up_proj": (self.mlp.gate_up_proj, dict(norm=True, silu_mul=True)),
            "down_proj": (self.mlp.down_proj, dict(residual=True)),
        }

    def forward_fused(self, positions, hidden: torch.Tensor, meta: AttentionMetadata) -> None:
        """The same layer for one token as four projections that carry the norms, residual adds and
        SiLU (`Linear.forward_fused`); `hidden` is the residual stream, updated in place."""
        attn, mlp = self.self_attn, self.mlp
        qkv = attn.qkv_proj.forward_fused(hidden, norm=self.input_layernorm)
        attn.o_proj.forward_fused(attn.attend(positions, qkv, meta), residual=hidden)
        act = mlp.gate_up_proj.forward_fused(hidden, norm=self.post_attention_layernorm, act=mlp.act)
        mlp.down_proj.forward_fused(act, residual=hidden)


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name fragment -> (our merged module name fragment, shard index)
    MERGED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {config.model_type!r} is not supported; tensorjet runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self.config = config
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_positions_of(config))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config, self.rotary, dtype) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
            self.tied_head_kernel = nn.functional.linear
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype)
        # One-token steps run `LlamaDecoderLayer.forward_fused` (set by `use_fused_decode`).
        self.fused_decode = False

    def use_triton_kernels(self) -> None:
        """Swap the PyTorch norm, rotary and activation ops for fused Triton kernels (same numerics)."""
        from tensorjet.kernels.activation import silu_and_mul as fused_silu_and_mul
        from tensorjet.kernels.norm import rms_norm
        from tensorjet.kernels.rotary import apply_rotary

        self.rotary.kernel = apply_rotary
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = rms_norm
            elif isinstance(module, LlamaMLP):
                module.act = fused_silu_and_mul

    def use_small_batch_gemv(self) -> None:
        """Give each linear shape the decode GEMV where it measures faster than cuBLAS (CUDA only)."""
        from tensorjet.kernels.gemv import MAX_M, gemv, select_gemv

        chosen: dict[tuple, object] = {}
        for module in self.modules():
            if not isinstance(module, Linear):
                continue
            key = (tuple(module.weight.shape), module.bias is not None)
            if key not in chosen:
                config, timings = select_gemv(module.weight, module.bias)
                chosen[key] = config
                gbps = module.weight.numel() * module.weight.element_size() / timings["gemv_m1"] / 1e6
                logger.info(
                    "linear %s: GEMV %.1f us (%.0f GB/s) vs cuBLAS %.1f us at M=1 -> %s",
                    key[0],
                    timings["gemv_m1"] * 1e3,
                    gbps,
                    timings["cublas_m1"] * 1e3,
                    config or "cuBLAS",
                )
            if chosen[key] is not None:
                module.small_batch_kernel = partial(gemv, config=chosen[key])
                module.small_batch_max_rows = MAX_M

    def use_fused_decode(self, timed: bool = True) -> None:
        """Run one-token steps through `LlamaDecoderLayer.forward_fused`: each projection's GEMV
        carries the norm, residual add or SiLU next to it (`tensorjet.kernels.fused_gemv`).

        timed: time each projection's best fused GEMV on this GPU and sum them over a layer, against
        cuBLAS plus the three kernels the fusion removes (two norms with their residual adds, SiLU;
        `FUSED_LAUNCH_US` each); the path is on only if the fused layer wins. Untimed (the CPU
        interpreter), it is on with the first candidate."""
        from tensorjet.kernels.fused_gemv import CANDIDATES, fused_gemv, select_fused_gemv

        projections = self.layers[0].fused_projections()
        configs = {name: CANDIDATES[0] for name in projections}
        use = True
        if timed:
            start = time.perf_counter()
            fused_us = 0.0
            unfused_us = 3 * FUSED_LAUNCH_US
            for name, (module, fusion) in projections.items():
                configs[name], timings = select_fused_gemv(module.weight, module.bias, **fusion)
                fused_us += timings["fused"] * 1e3
                unfused_us += timings["cublas"] * 1e3
                logger.info(
                    "fused decode %s: %.1f us (%s) vs cuBLAS %.1f us",
                    name,
                    timings["fused"] * 1e3,
                    configs[name],
                    timings["cublas"] * 1e3,
                )
            use = fused_us < unfused_us
            logger.info(
                "fused batch-1 decode layer: %.1f us vs %.1f us unfused -> %s (chosen in %.1fs)",
                fused_us,
                unfused_us,
                "on" if use else "off",
                time.perf_counter() - start,
            )
        # The GEMVs are bound either way, so a benchmark can flip `fused_decode` to compare.
        for layer in self.layers:
            for name, (module, _) in layer.fused_projections().items():
                module.fused_gemv = partial(fused_gemv, config=configs[name])
        self.fused_decode = use

    def use_onednn_linear(self) -> None:
        """CPU fp32: every weight product, the tied LM head's included, through oneDNN (`onednn_linear`)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = onednn_linear
        if self.lm_head is None:
            self.tied_head_kernel = onednn_linear

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Returns the final hidden states, [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        if self.fused_decode and input_ids.shape[0] == 1:
            for layer in self.layers:
                layer.forward_fused(positions, x, meta)
            return self.norm(x)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits; converted straight into `out` when given (a CUDA graph's static buffer: one pass
        over the [rows, vocab] logits instead of a conversion and then a copy)."""
        if self.lm_head is None:
            logits = self.tied_head_kernel(hidden, self.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return logits.float() if out is None else out.copy_(logits)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in; raises if a parameter is left unloaded or a name is unknown."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the head
            module_name, _, kind = name.rpartition(".")
            parts = module_name.split(".")
            if parts[-1] in self.MERGED:
                merged, shard = self.MERGED[parts[-1]]
                parts[-1] = merged
                self.get_submodule(".".join(parts)).load_shard(kind, tensor, shard)
                loaded.add(f"{'.'.join(parts)}.{kind}:{shard}")
                continue
            if parts[-1] in ("o_proj", "down_proj", "lm_head"):
                self.get_submodule(module_name).load_shard(kind, tensor)
                loaded.add(f"{module_name}.{kind}:0")
                continue
            if name not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} does not belong to a {self.config.model_type} model"
                )
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[name].shape)}"
                )
            params[name].data.copy_(tensor)
            loaded.add(f"{name}:0")
        missing = [n for n in self._expected_loads() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _expected_loads(self) -> list[str]:
        expected = []
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                for kind in ("weight", "bias") if module.has_bias else ("weight",):
                    expected += [f"{name}.{kind}:{s}" for s in range(len(module.output_sizes))]
            elif isinstance(module, (RMSNorm, nn.Embedding)):
                expected.append(f"{name}.weight:0")
        return expected

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights with the real shapes, scaled so activations stay finite (benchmarks only)."""
        gen = torch.Generator(self.embed_tokens.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                bound = param.shape[-1] ** -0.5
                param.data.uniform_(-bound, bound, generator=gen)
