"""A GGUF file in HF form: its config, its tokenizer and its weights as HF-named fp32 tensors
(dequantized, renamed, rope un-permuted).

Reading a GGUF takes seconds in the pure-Python readers, and a start needs it three times (config,
tokenizer, weights). So the first use of a file converts it once into a cache entry, an HF model
directory (config.json, the tokenizer files, model.safetensors, and the 4-bit blocks as they are in
`gguf_blocks.BLOCKS_FILE`), keyed by the file's content; later
starts read the entry and memory-map the weights. The cache root is $TENSORJET_CACHE, else
$XDG_CACHE_HOME/tensorjet, else ~/.cache/tensorjet; an entry is built beside its final place and
renamed into it, and one whose files do not match its manifest is rebuilt, never trusted.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from math import prod
from pathlib import Path

import torch
import transformers

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "conversion.json"  # written last: what the entry holds and what made it
# Bump when the conversion's output changes, so older entries are rebuilt.
CONVERSION_FORMAT = 2  # 2: the 4-bit blocks too (`gguf_blocks.BLOCKS_FILE`)
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


def cache_root() -> Path:
    if os.environ.get("TENSORJET_CACHE"):
        return Path(os.environ["TENSORJET_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tensorjet"


def converted(gguf_path: Path) -> Path | None:
    """The cache entry of `gguf_path`, converted now if it has none (or a broken one). None where the
    cache cannot be written: the caller then reads the GGUF itself."""
    digest = _sha256(gguf_path)
    entry = cache_root() / "gguf" / digest[:16]
    manifest = _manifest(digest)
    if _is_complete(entry, manifest):
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as error:
        logger.warning("cannot write the GGUF cache (%s); reading %s directly", error, gguf_path.name)
        return None
    try:
        logger.info("converting %s into %s (once per file)", gguf_path.name, entry)
        _convert(gguf_path, staging)
        manifest["files"] = {f.name: f.stat().st_size for f in staging.iterdir()}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _publish(staging, entry, manifest)
    except OSError as error:  # a full disk, a cache made read-only meanwhile
        logger.warning("cannot write the GGUF cache (%s); reading %s directly", error, gguf_path.name)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(digest: str) -> dict:
    """What an entry of this file must record: the converters' versions decide its contents too."""
    return {
        "format": CONVERSION_FORMAT,
        "gguf_sha256": digest,
        "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"),
    }


def _is_complete(entry: Path, manifest: dict) -> bool:
    """Whether `entry` was written whole by this conversion: a manifest that matches `manifest`, and
    every file it lists present at its recorded size."""
    try:
        recorded = json.loads((entry / MANIFEST_FILE).read_text())
        files = recorded.pop("files")
        return recorded == manifest and all((entry / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _publish(staging: Path, entry: Path, manifest: dict) -> None:
    """Rename the finished `staging` into `entry`, replacing a broken entry; where another process
    published a complete one first, keep that."""
    if entry.exists() and not _is_complete(entry, manifest):
        shutil.rmtree(entry, ignore_errors=True)
    try:
        staging.rename(entry)
    except OSError:
        if not _is_complete(entry, manifest):
            raise


def _convert(gguf_path: Path, out: Path) -> None:
    """Write `gguf_path` as an HF model directory into `out`, through transformers' own GGUF config and
    tokenizer conversion (what the direct path uses)."""
    # transformers' config and tokenizer loaders each parse the file and take no parsed reader, and the
    # weights parse it once more: three parses, once per file.
    config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.save_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)
    from gguf import GGUFReader

    from tensorjet.models.gguf_blocks import BLOCKS_FILE, write_blocks

    reader = GGUFReader(str(gguf_path))
    _write_safetensors(out / WEIGHTS_FILE, reader, config)
    write_blocks(out / BLOCKS_FILE, reader, config)


def iter_gguf_weights(
    gguf_path: Path, config: transformers.PretrainedConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors, one at a time, HF-named and as fp32."""
    from gguf import GGUFReader

    return _hf_tensors(GGUFReader(str(gguf_path)), config)


def _write_safetensors(file: Path, reader, config: transformers.PretrainedConfig) -> None:
    """Stream the converted tensors of a parsed GGUF (`reader`) into one safetensors file: the header
    (names, shapes, offsets) is known from the tensor table, so no more than one tensor is in memory at
    a time."""
    layout = [(_hf_name(t.name), _torch_shape(t)) for t in reader.tensors]
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        size = 4 * prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    free = shutil.disk_usage(file.parent).free
    if free < offset:  # fail before filling the disk; the caller then reads the GGUF directly
        raise OSError(errno.ENOSPC, f"the fp32 weights need {offset / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape), (_, tensor) in zip(layout, _hf_tensors(reader, config)):
            assert tensor.shape == shape and tensor.dtype == torch.float32, name
            f.write(tensor.contiguous().numpy().data)


def _hf_tensors(reader, config: transformers.PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import numpy as np
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        name, shape = _hf_name(tensor.name), _torch_shape(tensor)
        data = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        weight = torch.from_numpy(data.copy())
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weight = _unpermute_rope(weight, heads)
        yield name, weight


def _torch_shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first


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
