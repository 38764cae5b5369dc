"""What a model's linear layers make from its checkpoint once it is loaded (a kernel's packed layout, a
copy in another dtype: `LinearMethod.derived_layout`), kept in tensorjet's cache: a later start
memory-maps those tensors and takes them as the layers' own, instead of loading the checkpoint tensors
they are made from and converting them again (for the bundled model's GGUF blocks: packing them for
the int4 kernel, their bf16 copy and the LM head's int8 rows, seconds of every start).

An entry, `derived/<key>`, belongs to a checkpoint's content and how the model runs it (the weight
format, dtype and tensor-parallel rank); its manifest also records what decides the tensors besides:
torch's version and the CPU capability torch reports (a kernel's packing follows the vector width).
An entry made under other values, cut short or unreadable is made again in its place, never trusted
(`cache`); where the cache cannot be written the start goes on without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tensorjet.layers.linear import Linear
from tensorjet.models.cache import cache_root, is_complete, write_entry
from tensorjet.models.loader import ModelSource
from tensorjet.models.threads import one_thread

logger = logging.getLogger(__name__)

MANIFEST_FILE = "derived.json"  # written last: what the entry was made from and under
TENSORS_FILE = "derived.safetensors"  # `<layer>.<tensor>` of every layer that derives tensors
# Bump when what a method derives changes, so older entries are made again.
CACHE_FORMAT = 1
DATA_ALIGNMENT = 64  # bytes: a cache line, and AVX-512's vector
# safetensors' names of the dtypes derived tensors have
_DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}

# {layer name: {tensor name: tensor}}
LayerTensors = dict[str, dict[str, torch.Tensor]]


class LoadableModel(Protocol):
    def named_modules(self) -> Iterator[tuple[str, nn.Module]]: ...

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        derived: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None: ...


def load_weights(
    model: LoadableModel, weights: Iterable[tuple[str, torch.Tensor]], source: ModelSource, runs_as: dict
) -> None:
    """Load `weights` (of `source`) into `model`, its layers' derived tensors from the cache entry of
    this checkpoint run this way (`runs_as`: its weight format, dtype, rank, ...) where there is a
    valid one; else made as the model loads, and written for the next start."""
    layouts = _derived_layouts(model)
    if not layouts:
        model.load_weights(weights)
        return
    entry, manifest = _entry_of(source, runs_as)
    cached = _read(entry, manifest, layouts)
    with one_thread():  # loading and deriving: memory-bound work, made once
        model.load_weights(weights, derived=cached)
        if cached is None:
            _write(entry, manifest, _derived_tensors(model, layouts))


def _derived_layouts(model: LoadableModel) -> LayerTensors:
    """The meta tensors of what each linear layer will derive (layers that derive nothing left out)."""
    layouts = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and (layout := module.method.derived_layout(module)):
            layouts[name] = layout
    return layouts


def _derived_tensors(model: LoadableModel, layers: Iterable[str]) -> LayerTensors:
    modules = dict(model.named_modules())
    return {name: modules[name].method.derived_tensors(modules[name]) for name in layers}


def _entry_of(source: ModelSource, runs_as: dict) -> tuple[Path, dict]:
    """The entry's place (by checkpoint and how it runs) and the manifest it must hold."""
    made_from = {"checkpoint": source.content_digest(), **runs_as}
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
    manifest = {
        "format": CACHE_FORMAT,
        **made_from,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return cache_root() / "derived" / key[:24], manifest


def _read(entry: Path, manifest: dict, layouts: LayerTensors) -> LayerTensors | None:
    """The entry's tensors, memory-mapped, by layer; None where it has none that fit `layouts`."""
    if not is_complete(entry, MANIFEST_FILE, manifest):
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(entry / TENSORS_FILE), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as error:
        logger.warning("the derived weights in %s are unreadable (%s); making them again", entry, error)
        shutil.rmtree(entry, ignore_errors=True)  # whole as far as its manifest tells: it would stay
        return None
    by_layer: LayerTensors = {}
    for name, tensor in tensors.items():
        layer, _, part = name.rpartition(".")
        by_layer.setdefault(layer, {})[part] = tensor
    if not _fits(by_layer, layouts):
        logger.warning("the derived weights in %s do not fit the model; making them again", entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return by_layer


def _fits(tensors: LayerTensors, layouts: LayerTensors) -> bool:
    """Whether `tensors` holds exactly `layouts`' layers and names, each of its shape and dtype."""
    if tensors.keys() != layouts.keys():
        return False
    return all(
        tensors[layer].keys() == layout.keys()
        and all(
            tensors[layer][name].shape == meta.shape and tensors[layer][name].dtype == meta.dtype
            for name, meta in layout.items()
        )
        for layer, layout in layouts.items()
    )


def _write(entry: Path, manifest: dict, tensors: LayerTensors) -> None:
    flat = {f"{layer}.{name}": t for layer, parts in tensors.items() for name, t in parts.items()}

    def write(staging: Path) -> None:
        save_aligned(staging / TENSORS_FILE, flat)

    try:
        write_entry(entry, MANIFEST_FILE, manifest, write)
    except OSError as error:  # a read-only cache, a full disk: later starts derive them again
        logger.warning("cannot write the derived weights into the cache (%s); every start makes them", error)


def save_aligned(file: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """A safetensors file whose tensors start on `DATA_ALIGNMENT` boundaries where their sizes allow:
    the header padded with spaces (as the format allows) so the data starts aligned, the tensors whose
    sizes are multiples of it first. Memory-mapped, the tensors are used in place, and a GEMM over a
    misaligned weight runs a few percent slower."""
    order = sorted(tensors, key=lambda name: tensors[name].nbytes % DATA_ALIGNMENT != 0)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        tensor = tensors[name]
        dtype, shape, end = _DTYPES[tensor.dtype], list(tensor.shape), offset + tensor.nbytes
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % DATA_ALIGNMENT)
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in order:
            f.write(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().data)
