"""The steps of a Llama-family model whose projections run GGUF blocks on the CPU: one token of one
sequence (decode at batch 1), and steps of several tokens (batched decode, prompt chunks).

At batch 1 a layer's four int4 products take about 120 us on two cores, and the ops around them (norms,
rotary, cache writes, attention, dtype conversions: some 50 ATen calls through the modules' Python) as
long again; each small op costs several times its standalone time there, its memory evicted by the
weights streaming past. `GgufDecodeStep` runs the same layer in about 20 calls (and some views)
over tensors gathered once at start-up:

- The residual stream is held as [h; -h] ([2, hidden], fp32). Its mean is zero, so one `layer_norm`
  over it (the norm weight twice) is h's RMSNorm, up to the rounding of the sums; `addcmul_` by [1; -1]
  adds a product into both halves, each the same sum as h + y (negation is exact).
- The softmax scale is folded into the query's rotary tables, built once per step for every layer.
- Rotated keys and values go straight into their cache slot; attention reads the sequence's keys and
  values as a view of the cache where its blocks lie in order (else gathered by slot): two batched
  products and a softmax.
- SiLU-and-multiply runs in bf16, the int4 kernel's dtype on both sides.

Its perplexity through every decode step stays within 1% of the fp32 weights' (`docs/performance.md`).

A step of several tokens runs the same sums in larger ops, over every row at once: the residual stream
as [h; -h] per row and each RMSNorm one `layer_norm` (a fifth of `rms_norm`'s time at 512 rows on this
path's CPU), SiLU-and-multiply in bf16 straight from the product's output (no fp32 copy of the [rows,
2 * intermediate] gate|up), the rotary tables gathered once, keys and values written to their slots by
one `index_copy_` each, and attention through the layer's backend. Past `SMALL_BATCH_MAX_ROWS` rows the
products run the bf16 weights in oneDNN's blocked layout (`pack_dense`), made once batching starts:
a 32-row decode step's products take about 20% less than through `F.linear`, which reorders the weight
on every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from tensorjet.layers.attention import store_kv
from tensorjet.quant import gguf
from tensorjet.quant.gguf import GgufLinearMethod, blocks_product

if TYPE_CHECKING:
    from tensorjet.layers.attention import Attention, AttentionMetadata
    from tensorjet.layers.linear import Linear
    from tensorjet.layers.norm import RMSNorm
    from tensorjet.models.llama import LlamaForCausalLM


class _Product:
    """A projection's kernel tensors (plain tensors: no module attribute lookups in the step)."""

    __slots__ = ("qweight", "scales_and_zeros", "dense_weight", "bias", "packed")

    def __init__(self, layer: Linear) -> None:
        self.qweight, self.scales_and_zeros = layer.qweight.data, layer.scales_and_zeros.data
        self.dense_weight = layer.dense_weight.data
        self.bias = None if layer.bias is None else layer.bias.data
        self.packed: torch.Tensor | None = None  # `pack`'s

    def pack(self) -> None:
        """Make the bf16 weight's oneDNN layout, which `rows` multiplies by from then on."""
        self.packed = gguf.pack_dense(self.dense_weight)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bf16 -> [M, N] bf16 (fp32 with a bias), as `blocks_product` chooses its kernel."""
        return gguf.blocks_matmul(
            x, self.qweight, self.scales_and_zeros, self.dense_weight, self.packed, self.bias
        )


class _Layer(NamedTuple):
    input_norm: torch.Tensor  # the RMSNorm weight twice, [2 * hidden]
    qkv: _Product
    o: _Product
    post_norm: torch.Tensor
    gate_up: _Product
    down: _Product
    attn: Attention


def _doubled(norm: RMSNorm) -> torch.Tensor:
    return torch.cat((norm.weight.data, norm.weight.data))


class GgufDecodeStep:
    """`LlamaForCausalLM.forward` for a model that runs GGUF blocks: the final hidden states, [rows,
    hidden]."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        attn = model.layers[0].self_attn
        self.hidden = model.config.hidden_size
        self.eps = model.norm.eps
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.qk_size = (self.num_heads + self.num_kv_heads) * self.head_dim
        self.inter = model.layers[0].mlp.gate_up_proj.output_sizes[0]
        self.embed = model.embed_tokens
        self.cos, self.sin = model.rotary.cos, model.rotary.sin
        # Rotary rows of q (the softmax scale folded in) and of k.
        self.row_scale = torch.ones(self.num_heads + self.num_kv_heads, 1)
        self.row_scale[: self.num_heads] = attn.attn.scale
        self.sign = torch.tensor([[1.0], [-1.0]])
        self.final_norm = _doubled(model.norm)
        self.layers = [
            _Layer(
                _doubled(layer.input_layernorm),
                _Product(layer.self_attn.qkv_proj),
                _Product(layer.self_attn.o_proj),
                _doubled(layer.post_attention_layernorm),
                _Product(layer.mlp.gate_up_proj),
                _Product(layer.mlp.down_proj),
                layer.self_attn.attn,
            )
            for layer in model.layers
        ]
        # Each layer's caches as [slots, kv heads, head_dim], made again when the runner binds new ones.
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._caches_of: torch.Tensor | None = None
        # The products' bf16 weights are packed (`pack_dense`, ~0.1 s) by the first step past
        # `SMALL_BATCH_MAX_ROWS` rows that holds several sequences, or by the second such step: a lone
        # first prompt (start-up's first token) does not wait for it.
        self._dense_steps = 0
        self._packed = False

    @staticmethod
    def runs(model: LlamaForCausalLM, kv_cache_dtype: torch.dtype) -> bool:
        """Whether it runs `model`: every projection GGUF blocks through the int4 kernel, one rank, no
        per-head q/k norm, and a KV cache in the model's dtype (no FP8 scales)."""
        projections = [
            proj
            for layer in model.layers
            for proj in (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
        ]
        blocks = all(
            isinstance(p.method, GgufLinearMethod) and p.method.product is blocks_product for p in projections
        )
        dtype = model.embed_tokens.weight.dtype
        plain = model.tp.size == 1 and not model.layers[0].self_attn.qk_norm
        return blocks and plain and kv_cache_dtype == dtype and model.rotary.kernel is None

    def _bound_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._caches_of is not self.layers[0].attn.k_cache:
            shape = (-1, self.num_kv_heads, self.head_dim)
            self._caches = [
                (layer.attn.k_cache.view(shape), layer.attn.v_cache.view(shape)) for layer in self.layers
            ]
            self._caches_of = self.layers[0].attn.k_cache
        return self._caches

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if input_ids.shape[0] > 1:
            return self._rows(input_ids, positions, meta)
        hidden, d, group = self.hidden, self.head_dim, self.num_heads // self.num_kv_heads
        x = self.embed(input_ids)
        stream = torch.cat((x, x.neg()))  # [h; -h]
        flat = stream.view(1, -1)
        pos = int(positions[0])
        cos, sin = self.cos[pos], self.sin[pos]
        # x * [cos|cos] + [x2|x1] * [-sin|sin] is [x1 cos - x2 sin | x2 cos + x1 sin] (rotate-half).
        cos = torch.cat((cos, cos)) * self.row_scale
        sin = torch.cat((sin.neg(), sin)) * self.row_scale
        slot, length = int(meta.slot_mapping[0]), meta.context_lens[0]
        read = self._reader(meta, slot, length)
        for layer, (k_cache, v_cache) in zip(self.layers, self._bound_caches()):
            x = F.layer_norm(flat, (2 * hidden,), layer.input_norm, None, self.eps)[:, :hidden]
            qkv = layer.qkv.rows(x.to(torch.bfloat16))[0]
            qk = qkv[: self.qk_size].float().view(-1, d)
            qk = torch.addcmul(qk * cos, qk.view(-1, 2, d // 2).flip(1).view(-1, d), sin)
            k_cache[slot].copy_(qk[self.num_heads :])
            v_cache[slot].copy_(qkv[self.qk_size :].view(-1, d))
            keys, values = read(k_cache), read(v_cache)  # [L, kv heads, D]
            scores = torch.bmm(qk[: self.num_heads].view(-1, group, d), keys.permute(1, 2, 0))
            out = torch.bmm(scores.softmax(-1), values.transpose(0, 1)).view(1, -1)
            stream.addcmul_(self.sign, layer.o.rows(out.to(torch.bfloat16)))
            x = F.layer_norm(flat, (2 * hidden,), layer.post_norm, None, self.eps)[:, :hidden]
            gate_up = layer.gate_up.rows(x.to(torch.bfloat16))
            act = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
            stream.addcmul_(self.sign, layer.down.rows(act.to(torch.bfloat16)))
        return F.layer_norm(flat, (2 * hidden,), self.final_norm, None, self.eps)[:, :hidden]

    @staticmethod
    def _reader(meta: AttentionMetadata, slot: int, length: int):
        """The sequence's `length` cache rows: a slice where its blocks lie in order, else a gather."""
        bs = meta.block_size
        blocks = meta.block_tables[0, : -(-length // bs)]
        start = int(blocks[0])
        in_order = torch.equal(blocks, torch.arange(start, start + len(blocks), dtype=blocks.dtype))
        if in_order and slot == start * bs + length - 1:
            return lambda cache: cache[start * bs : slot + 1]
        p = torch.arange(length)
        slots = blocks.long()[p // bs] * bs + p % bs
        return lambda cache: cache.index_select(0, slots)

    def _rows(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """A step of several tokens: the fused decoder layers' sums, every row at once (see the module's
        docstring); attention through the layers' backend, its state prepared once for the step."""
        hidden, d = self.hidden, self.head_dim
        heads = self.num_heads + self.num_kv_heads
        rows = input_ids.shape[0]
        x = self.embed(input_ids)
        stream = torch.cat((x, x.neg()), 1)  # [T, 2 * hidden]: each row [h; -h]
        halves = stream.view(rows, 2, hidden)
        cos, sin = self.cos[positions], self.sin[positions]
        cos = torch.cat((cos, cos), -1)[:, None]
        sin = torch.cat((sin.neg(), sin), -1)[:, None]
        if rows > gguf.SMALL_BATCH_MAX_ROWS and not self._packed:
            self._dense_steps += 1
            if self._dense_steps > 1 or meta.num_seqs > 1:
                for layer in self.layers:
                    for product in (layer.qkv, layer.o, layer.gate_up, layer.down):
                        product.pack()
                self._packed = True
        attn0 = self.layers[0].attn
        if meta.state is None:
            meta.state = attn0.backend.prepare(meta)
        scale, skips = attn0.scale, bool((meta.slot_mapping < 0).any())  # skips: a padded row
        for layer in self.layers:
            x = F.layer_norm(stream, (2 * hidden,), layer.input_norm, None, self.eps)[:, :hidden]
            qkv = layer.qkv.rows(x.to(torch.bfloat16))
            qk = qkv[:, : self.qk_size].float().view(rows, heads, d)
            x1, x2 = qk.chunk(2, dim=-1)
            qk = torch.cat((x2, x1), -1).mul_(sin).add_(qk * cos)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, self.qk_size :].float().view(rows, self.num_kv_heads, d)
            store_kv(k, v, layer.attn.k_cache, layer.attn.v_cache, meta.slot_mapping, skips)
            out = layer.attn.backend.forward(
                q, layer.attn.k_cache, layer.attn.v_cache, meta.state, scale, k_new=k, v_new=v
            )
            halves.addcmul_(self.sign, layer.o.rows(out.view(rows, -1).to(torch.bfloat16))[:, None])
            x = F.layer_norm(stream, (2 * hidden,), layer.post_norm, None, self.eps)[:, :hidden]
            gate_up = layer.gate_up.rows(x.to(torch.bfloat16))
            act = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
            halves.addcmul_(self.sign, layer.down.rows(act.to(torch.bfloat16))[:, None])
        return F.layer_norm(stream, (2 * hidden,), self.final_norm, None, self.eps)[:, :hidden]
