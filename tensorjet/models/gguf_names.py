"""GGUF tensor names as HF names, and the rope row order llama.cpp writes undone: what the fp32
conversion (`gguf_convert`) and the 4-bit blocks (`gguf_blocks`) agree on."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# GGUF tensor name -> HF name, for the llama-style architectures GGUF files use.
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    if base in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[base]}.{kind}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF counterpart")
    return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{kind}"


def rope_settings(config: Any) -> dict[str, Any]:
    """What `hf_rows` needs of an HF config object (`ModelConfig` or transformers')."""
    return {
        "model_type": config.model_type,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
    }


def hf_rows(name: str, rows: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """A tensor's rows (of the HF module `name`) in HF order: llama.cpp interleaves each q/k head's
    rotary halves in a Llama file, HF keeps them as two halves."""
    if config["model_type"] != "llama" or not name.endswith(
        ("q_proj.weight", "k_proj.weight", "q_proj", "k_proj")
    ):
        return rows
    heads = config["num_attention_heads"]
    if "k_proj" in name:
        heads = config.get("num_key_value_heads") or heads
    count = rows.shape[0]
    return rows.reshape(heads, count // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
