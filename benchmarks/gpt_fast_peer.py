"""The peer for batch-1 decode: a Llama written the way gpt-fast writes it (a static KV cache, one
`torch.compile(mode="reduce-overhead")` decode step, SDPA, rotary by complex multiplication), with its
linear layers in bf16 or in gpt-fast's INT4 form (PyTorch's tinygemm, `WeightOnlyInt4Linear`: codes
packed by `_convert_weight_to_int4pack`, group 128, a bf16 scale and zero per group), on dummy weights
of a preset's shapes. It times ms per token at batch 1 after a 128-token prompt, as
`benchmarks/gpu_suite.py` times tensorjet.

    python benchmarks/gpt_fast_peer.py --model llama-3-8b --weights int4 --json out.json
    python benchmarks/gpt_fast_peer.py --model llama-3-8b --weights bf16
    python benchmarks/gpt_fast_peer.py --device cpu --model tiny --no_compile   # the path, on the CPU

Written from gpt-fast's design (pytorch-labs/gpt-fast, `model.py` and `quantize.py`), not its code.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 128
INNER_K_TILES = 8


@dataclass(frozen=True)
class Shapes:
    dim: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_base: float = 500000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


PRESETS = {
    "llama-3-8b": Shapes(4096, 32, 32, 8, 14336, 128256),
    "llama-3-70b": Shapes(8192, 80, 64, 8, 28672, 128256),
    "tiny": Shapes(256, 2, 4, 2, 512, 1024),
}


class Int4Linear(nn.Module):
    """gpt-fast's `WeightOnlyInt4Linear`: y = tinygemm(x, packed codes, scales and zeros)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device, generator) -> None:
        super().__init__()
        self.out_features = out_features
        codes = torch.randint(
            0, 16, (out_features, in_features), dtype=torch.int32, device=device, generator=generator
        )
        if device.type == "cuda":
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        groups = in_features // GROUP
        scales = torch.full((groups, out_features), in_features**-0.5 / 8, device=device)
        zeros = torch.zeros(groups, out_features, device=device)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack((scales, zeros), -1).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(rows, self.packed, GROUP, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def linear(in_features: int, out_features: int, weights: str, device, generator) -> nn.Module:
    if weights == "int4":
        return Int4Linear(in_features, out_features, device, generator)
    layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    nn.init.uniform_(layer.weight, -(in_features**-0.5), in_features**-0.5, generator=generator)
    return layer


class Attention(nn.Module):
    def __init__(self, s: Shapes, weights: str, max_seq: int, device, generator) -> None:
        super().__init__()
        self.s = s
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.wqkv = linear(s.dim, qkv, weights, device, generator)
        self.wo = linear(s.heads * s.head_dim, s.dim, weights, device, generator)
        cache = (1, s.kv_heads, max_seq, s.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache, dtype=torch.bfloat16, device=device))
        self.register_buffer("v_cache", torch.zeros(cache, dtype=torch.bfloat16, device=device))

    def forward(self, x, freqs, mask, input_pos):
        s, (b, t, _) = self.s, x.shape
        q, k, v = self.wqkv(x).split(
            [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1
        )
        q = rotate(q.view(b, t, s.heads, s.head_dim), freqs).transpose(1, 2)
        k = rotate(k.view(b, t, s.kv_heads, s.head_dim), freqs).transpose(1, 2)
        v = v.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        repeat = s.heads // s.kv_heads
        keys = self.k_cache.repeat_interleave(repeat, dim=1)
        values = self.v_cache.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, s: Shapes, weights: str, max_seq: int, device, generator) -> None:
        super().__init__()
        self.attention = Attention(s, weights, max_seq, device, generator)
        self.w1 = linear(s.dim, s.intermediate, weights, device, generator)
        self.w3 = linear(s.dim, s.intermediate, weights, device, generator)
        self.w2 = linear(s.intermediate, s.dim, weights, device, generator)
        self.attention_norm = nn.RMSNorm(s.dim, s.eps, device=device, dtype=torch.bfloat16)
        self.ffn_norm = nn.RMSNorm(s.dim, s.eps, device=device, dtype=torch.bfloat16)

    def forward(self, x, freqs, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class Transformer(nn.Module):
    def __init__(self, s: Shapes, weights: str, max_seq: int, device: torch.device, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator(device).manual_seed(seed)
        self.embed = nn.Embedding(s.vocab, s.dim, device=device, dtype=torch.bfloat16)
        nn.init.normal_(self.embed.weight, std=0.02, generator=generator)
        self.layers = nn.ModuleList(Block(s, weights, max_seq, device, generator) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.dim, s.eps, device=device, dtype=torch.bfloat16)
        self.output = linear(s.dim, s.vocab, "bf16", device, generator)  # gpt-fast keeps the head in bf16
        angles = torch.outer(
            torch.arange(max_seq, device=device).float(),
            1.0 / s.rope_base ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim),
        )
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles))
        causal = torch.ones(max_seq, max_seq, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal", causal)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        mask = self.causal[None, None, input_pos]
        freqs = self.freqs[input_pos]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos)
        return self.output(self.norm(x))


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as gpt-fast applies it: pairs of features as complex numbers."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3).type_as(x)


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    logits = model(token, input_pos)
    return logits[:, -1].argmax(-1, keepdim=True)


def ms_per_token(model: Transformer, step, prompt_len: int, new_tokens: int, device: torch.device) -> float:
    """Prefill `prompt_len` random tokens, then `new_tokens` greedy steps through `step`; the decode's
    ms per token (the prompt's pass excluded)."""
    vocab = model.embed.num_embeddings
    prompt = torch.randint(0, vocab, (1, prompt_len), device=device)
    with torch.no_grad():
        token = decode_one_token(model, prompt, torch.arange(prompt_len, device=device))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for i in range(new_tokens):
            # (a CUDA-graph step's output is overwritten by its next replay: gpt-fast clones it too)
            token = step(model, token, torch.tensor([prompt_len + i], device=device)).clone()
        sync()
    return (time.perf_counter() - start) / new_tokens * 1e3


def measure(
    preset: str,
    weights: str,
    device: torch.device,
    prompt_len: int = 128,
    new_tokens: int = 256,
    compile: bool = True,
) -> dict:
    """Build the peer on dummy weights of `preset`'s shapes and time its batch-1 decode (ms per token);
    the model is freed before returning."""
    begin = time.perf_counter()
    model = Transformer(PRESETS[preset], weights, prompt_len + new_tokens + 8, device).eval()
    step = decode_one_token
    if compile:
        step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    ms_per_token(model, step, prompt_len, 8, device)  # compiles and captures the step
    ready_s = time.perf_counter() - begin
    ms = ms_per_token(model, step, prompt_len, new_tokens, device)
    del model, step
    if device.type == "cuda":
        torch.compiler.reset()
        torch.cuda.empty_cache()
    return {
        "peer": "gpt-fast style",
        "model": preset,
        "weights": weights,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "compiled": compile,
        "ms_per_token": ms,
        "build_and_compile_s": ready_s,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    parser.add_argument("--weights", default="int4", choices=("int4", "bf16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--no_compile", action="store_true", help="eager (a smoke run of the path)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = measure(
        args.model, args.weights, torch.device(args.device), args.prompt_len, args.new_tokens,
        compile=not args.no_compile,
    )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"gpt-fast style {args.model} {args.weights} on {result['device']}: {result['ms_per_token']:.3f} "
          f"ms/token at batch 1 (built and compiled in {result['build_and_compile_s']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
