"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Input is one step's tokens flattened across sequences ([num_tokens]); attention metadata says which
tokens belong to which sequence. Weights load from HF-named tensors into merged q|k|v and gate|up.

Under tensor parallelism (`tp`) each rank holds its share of the attention heads (key/value heads
replicated where the ranks outnumber them), of the MLP's intermediate rows and of the vocabulary:
q|k|v and gate|up are column-parallel, o and down row-parallel (an all-reduce after each), the embedding
and LM head split by vocabulary, with the logits gathered on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from tensorjet.distributed import SINGLE, TensorParallel
from tensorjet.layers.activation import SiluAndMul
from tensorjet.layers.attention import Attention, AttentionMetadata
from tensorjet.layers.embedding import VocabParallelEmbedding
from tensorjet.layers.linear import (
    ColumnParallel,
    HeadMethodFactory,
    Linear,
    LinearMethodFactory,
    RowParallel,
    TiedLinearMethod,
    UnquantizedLinearMethod,
)
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.rotary import RotaryEmbedding
from tensorjet.models.loader import load_packed_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def max_positions_of(config: PretrainedConfig) -> int:
    return int(getattr(config, "max_position_embeddings", 4096))


def kv_heads_of(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_tensor_parallel(config: PretrainedConfig, size: int) -> None:
    """Raise ValueError unless `size` ranks can split the model: they must divide the attention heads
    and the MLP's intermediate size, and divide the key/value heads or be a multiple of them (each then
    held by several ranks). The vocabulary need not divide (the last rank's rows are padded)."""
    heads, kv_heads = config.num_attention_heads, kv_heads_of(config)
    rules = []
    if heads % size:
        rules.append(f"divide num_attention_heads ({heads})")
    if kv_heads % size and size % kv_heads:
        rules.append(f"divide num_key_value_heads ({kv_heads}) or be a multiple of it")
    if config.intermediate_size % size:
        rules.append(f"divide intermediate_size ({config.intermediate_size})")
    if rules:
        raise ValueError(f"option tensor_parallel_size={size} must {', and '.join(rules)} of this model")


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        linear_method: LinearMethodFactory,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        q_size, kv_size = config.num_attention_heads * self.head_dim, kv_heads_of(config) * self.head_dim
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        self.qkv_proj = Linear(
            config.hidden_size,
            [q_size, kv_size, kv_size],
            bias=qkv_bias,
            dtype=dtype,
            method=linear_method(),
            parallel=ColumnParallel(tp, unit=self.head_dim, replicate=True),
        )
        self.o_proj = Linear(
            q_size,
            config.hidden_size,
            bias=bool(getattr(config, "attention_bias", False)),
            dtype=dtype,
            method=linear_method(),
            parallel=RowParallel(tp),
        )
        self.q_size, self.kv_size, _ = self.qkv_proj.output_sizes  # this rank's heads
        self.num_heads, self.num_kv_heads = self.q_size // self.head_dim, self.kv_size // self.head_dim
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
    def __init__(
        self,
        config: PretrainedConfig,
        dtype: torch.dtype,
        linear_method: LinearMethodFactory,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        inter = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = Linear(
            config.hidden_size,
            [inter, inter],
            bias=bias,
            dtype=dtype,
            method=linear_method(),
            parallel=ColumnParallel(tp),
        )
        self.down_proj = Linear(
            inter,
            config.hidden_size,
            bias=bias,
            dtype=dtype,
            method=linear_method(),
            parallel=RowParallel(tp),
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        linear_method: LinearMethodFactory,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, dtype, linear_method, tp)
        self.mlp = LlamaMLP(config, dtype, linear_method, tp)
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

    def fused_projections(self) -> dict[str, tuple[Linear, dict[str, bool]]]:
        """The projections `forward_fused` runs, each with what it fuses in (`fused_gemv` options)."""
        return {
            "qkv_proj": (self.self_attn.qkv_proj, dict(norm=True)),
            "o_proj": (self.self_attn.o_proj, dict(residual=True)),
            "gate_up_proj": (self.mlp.gate_up_proj, dict(norm=True, silu_mul=True)),
            "down_proj": (self.mlp.down_proj, dict(residual=True)),
        }

    def forward_fused(self, positions, hidden: torch.Tensor, meta: AttentionMetadata) -> None:
        """The same layer for a step of a few tokens as four projections that carry the norms, residual
        adds and SiLU (`Linear.forward_fused`); `hidden` is the residual stream, updated in place."""
        attn, mlp = self.self_attn, self.mlp
        qkv = attn.qkv_proj.forward_fused(hidden, norm=self.input_layernorm)
        attn.o_proj.forward_fused(attn.attend(positions, qkv, meta), residual=hidden)
        act = mlp.gate_up_proj.forward_fused(hidden, norm=self.post_attention_layernorm, act=mlp.act)
        mlp.down_proj.forward_fused(act, residual=hidden)


# Where checkpoints keep an FP8 KV cache's per-layer scales (compressed-tensors, ModelOpt, older
# exports), relative to a decoder layer -> our attention module's parameter.
_KV_SCALE_NAMES = {
    "self_attn.k_scale": "self_attn.attn.k_scale_param",
    "self_attn.v_scale": "self_attn.attn.v_scale_param",
    "self_attn.k_proj.k_scale": "self_attn.attn.k_scale_param",
    "self_attn.v_proj.v_scale": "self_attn.attn.v_scale_param",
    "self_attn.k_proj.output_scale": "self_attn.attn.k_scale_param",
    "self_attn.v_proj.output_scale": "self_attn.attn.v_scale_param",
}


def _kv_scale_name(name: str) -> str:
    """`layers.N.self_attn.k_scale` (or another exporter's spelling) -> our parameter's name."""
    prefix, dot, rest = name.partition(".")
    index, dot2, local = rest.partition(".")
    ours = _KV_SCALE_NAMES.get(local) if prefix == "layers" else None
    return f"layers.{index}.{ours}" if ours else name


class LlamaForCausalLM(nn.Module):
    # Our merged module -> the checkpoint modules whose weights it holds, in row order (shard ids).
    packed_modules_mapping = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(
        self,
        config: PretrainedConfig,
        dtype: torch.dtype = torch.float32,
        linear_method: LinearMethodFactory = UnquantizedLinearMethod,
        kv_cache_scales: bool = False,
        tp: TensorParallel = SINGLE,
        head_method: HeadMethodFactory | None = None,
    ) -> None:
        """linear_method: the weight format of the decoder layers' projections; the LM head keeps the
        unquantized one (over the token embedding where the two are tied), or runs the format
        `head_method` makes of it. kv_cache_scales: the checkpoint has per-layer `k_scale`/`v_scale`
        tensors for an FP8 KV cache. tp: this process's rank among those the weights are split over
        (`check_tensor_parallel` says whether they can be)."""
        super().__init__()
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {config.model_type!r} is not supported; tensorjet runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if tp.size > 1:
            check_tensor_parallel(config, tp.size)
        self.config = config
        self.tp = tp
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_positions_of(config))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(
            [
                LlamaDecoderLayer(config, self.rotary, dtype, linear_method, tp)
                for _ in range(config.num_hidden_layers)
            ]
        )
        if kv_cache_scales:
            for attn in self.attention_layers:
                attn.add_kv_scale_parameters()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        float_head = (
            TiedLinearMethod(self.embed_tokens.weight)
            if self.tie_word_embeddings
            else UnquantizedLinearMethod()
        )
        self.lm_head = Linear(
            config.hidden_size,
            config.vocab_size,
            dtype=dtype,
            method=float_head if head_method is None else head_method(float_head),
            parallel=ColumnParallel(tp, pad=True),
        )
        # One-token steps, and steps of as many tokens as `fused_rows` holds, run
        # `LlamaDecoderLayer.forward_fused`; set at start-up where it pays
        # (`tensorjet.runtime.kernel_selection`), and a benchmark may flip it to compare.
        self.fused_decode = False
        self.fused_rows = range(0)
        # Every step through a whole-model step where one is set at start-up: GGUF blocks on the CPU run
        # `tensorjet.models.gguf_decode.GgufDecodeStep` (one token of one sequence, and steps of several
        # tokens: batched decode, prompt chunks).
        self.decode_step: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor] | None = (
            None
        )

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def kv_scales(self) -> list[tuple[float, float]] | None:
        """Each layer's loaded (k_scale, v_scale); None where the checkpoint has none."""
        if not hasattr(self.attention_layers[0], "k_scale_param"):
            return None
        return [(a.k_scale_param.item(), a.v_scale_param.item()) for a in self.attention_layers]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Returns the final hidden states, [num_tokens, hidden]."""
        rows = input_ids.shape[0]
        if self.decode_step is not None:
            return self.decode_step(input_ids, positions, meta)
        x = self.embed_tokens(input_ids)
        if self.fused_decode and (rows == 1 or rows in self.fused_rows):
            for layer in self.layers:
                layer.forward_fused(positions, x, meta)
            return self.norm(x)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """fp32 logits; converted straight into `out` when given (a CUDA graph's static buffer: one pass
        over the [rows, vocab] logits instead of a conversion and then a copy). Under tensor parallelism
        each rank computes its slice of the vocabulary and rank 0 gathers them; the other ranks get None."""
        logits = self.lm_head(hidden)
        if self.tp.size > 1:
            logits = self.tp.gather_to_first(logits)
            if logits is None:
                return None
            logits = logits[:, : self.config.vocab_size]
        return logits.float() if out is None else out.copy_(logits)

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        derived: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Copy HF-named tensors in; raises if a parameter is left unloaded or a name is unknown.
        `derived`: by linear layer name, the tensors its method made at an earlier start
        (`LinearMethod.derived_tensors`); such a layer takes them instead of the checkpoint tensors
        they were made from."""
        skip = "lm_head.weight" if self.tie_word_embeddings else None  # tied: the embedding serves
        ours = (
            (_kv_scale_name(name.removeprefix("model.")), tensor)
            for name, tensor in weights
            if "rotary_emb" not in name and name != skip
        )
        derived = derived or {}
        linears = {name: m for name, m in self.named_modules() if isinstance(m, Linear)}
        in_place = set()
        for name, tensors in derived.items():
            layer = linears[name]
            in_place |= {f"{name}.{param}" for param in (*layer.method.derived_from, *tensors)}
            layer.method.use_derived_tensors(layer, tensors)
        load_packed_weights(self, ours, self.packed_modules_mapping, self.config.model_type, in_place)
        for name, layer in linears.items():
            if name not in derived:
                layer.method.process_weights_after_loading(layer)

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights with the real shapes, scaled so activations stay finite (benchmarks only); each
        linear layer's method makes them in its own format."""
        gen = torch.Generator(self.embed_tokens.weight.device).manual_seed(seed)
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        # The embedding fills its rows itself, first: a tied head's method may make more from them.
        owned = {id(p) for m in linears for p in m.parameters()} - {id(self.embed_tokens.weight)}
        for name, param in self.named_parameters():
            if id(param) in owned or param.dim() == 0:  # linear layers' own; KV scales stay 1.0
                continue
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                bound = param.shape[-1] ** -0.5
                param.data.uniform_(-bound, bound, generator=gen)
        for layer in linears:
            layer.method.init_dummy_weights(layer, gen)
