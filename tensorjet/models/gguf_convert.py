"""A GGUF file as an HF model directory: config.json, the tokenizer files, model.safetensors (HF-named
fp32 tensors: dequantized, renamed, rope un-permuted) and its 4-bit tensors' blocks (`gguf_blocks`), from
one parse of the file.

The config keys are transformers' own reading of a GGUF (`AutoConfig.from_pretrained(..., gguf_file=)`
gives the same config from this config.json), for the architectures tensorjet runs; the tokenizer is
written as transformers writes it (`gguf_tokenizer`), or through transformers where its model is not
byte-level BPE.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from math import prod
from pathlib import Path
from typing import Any

import torch

from tensorjet.models.gguf_blocks import BLOCKS_FILE, write_blocks
from tensorjet.models.gguf_dequant import dequantize
from tensorjet.models.gguf_names import hf_name, hf_rows, rope_settings
from tensorjet.models.gguf_reader import GGUFFile
from tensorjet.models.gguf_tokenizer import UnsupportedTokenizer, write_tokenizer

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
# llama.cpp's metadata keys (after "<architecture>.") -> HF config keys, per architecture.
_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_CONFIG_KEYS = {
    "llama": {**_COMMON_KEYS, "rope.dimension_count": "head_dim"},
    "mistral": {**_COMMON_KEYS, "rope.dimension_count": "head_dim"},
    "qwen2": _COMMON_KEYS,
    "qwen3": _COMMON_KEYS,
}
_TOKEN_ID_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "unk_token_id": "tokenizer.ggml.unknown_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def convert(gguf_path: Path, out: Path) -> None:
    """Write `gguf_path` as an HF model directory into `out`."""
    gguf = GGUFFile.open(gguf_path)
    config = hf_config(gguf)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    try:
        write_tokenizer(gguf.metadata, out)
    except UnsupportedTokenizer as reason:
        logger.info("%s; converting the tokenizer through transformers", reason)
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(out)
    write_safetensors(out / WEIGHTS_FILE, gguf, config)
    write_blocks(out / BLOCKS_FILE, gguf, config)


def hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The HF config a GGUF's metadata describes, keyed as transformers reads GGUF files."""
    metadata, architecture = gguf.metadata, gguf.architecture
    # llama.cpp writes Mistral as llama; transformers tells them apart by the model's name alone.
    mistral = architecture == "llama" and metadata.get("general.name") == "mistral"
    model_type = "mistral" if mistral else architecture
    if model_type not in _CONFIG_KEYS:
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported; tensorjet runs {', '.join(_CONFIG_KEYS)}"
        )
    config: dict[str, Any] = {"model_type": model_type}
    if "general.name" in metadata:
        config["_model_name_or_path"] = metadata["general.name"]
    for key, name in _CONFIG_KEYS[model_type].items():
        if f"{architecture}.{key}" in metadata:
            config[name] = metadata[f"{architecture}.{key}"]
    for name, key in _TOKEN_ID_KEYS.items():
        if key in metadata:
            config[name] = metadata[key]
    # llama.cpp writes the output projection only where it is not the token embedding.
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in gguf.tensors)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config


def iter_gguf_weights(gguf_path: Path, config) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors, one at a time, HF-named and as fp32 (`config`: its HF config)."""
    return _hf_tensors(GGUFFile.open(gguf_path), rope_settings(config))


def write_safetensors(file: Path, gguf: GGUFFile, config: dict[str, Any]) -> None:
    """Stream the converted tensors into one safetensors file: the header (names, shapes, offsets) is
    known from the GGUF's tensor table, so no more than one tensor is in memory at a time."""
    layout = [(hf_name(t.name), t.shape) for t in gguf.tensors]
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        size = 4 * prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    # The data starts 64-byte aligned, and so does each tensor of the usual shapes (sizes multiples of
    # 64 bytes): memory-mapped weights are used in place, and a GEMM over a misaligned one runs slower.
    blob += b" " * (-(8 + len(blob)) % 64)
    free = shutil.disk_usage(file.parent).free
    if free < offset:  # fail before filling the disk; the caller then reads the GGUF directly
        raise OSError(errno.ENOSPC, f"the fp32 weights need {offset / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape), (_, tensor) in zip(layout, _hf_tensors(gguf, config)):
            assert tensor.shape == shape and tensor.dtype == torch.float32, name
            f.write(tensor.contiguous().numpy().data)


def _hf_tensors(gguf: GGUFFile, config: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in gguf.tensors:
        name = hf_name(tensor.name)
        yield name, hf_rows(name, dequantize(gguf.raw(tensor), tensor.ggml_type, tensor.shape), config)
