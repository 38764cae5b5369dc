"""A GGUF file's 4-bit weight blocks, kept exact for the compact CPU weight format (`quantization=gguf`).

Q4_0 and Q4_1 store each row in blocks of 32 weights: one fp16 scale `d` (and for Q4_1 one fp16 minimum
`m`) and 32 4-bit codes q, with w = d * q + m (Q4_0: w = d * (q - 8), i.e. m = -8 d, exact in fp16).
Each such tensor is unpacked here into HF-named parts, rows un-permuted for rope as the fp32 weights are:
- `<module>.qweight`: uint8 [N, K], one code per byte (0..15), column order as in the fp32 weight;
- `<module>.scales` and `<module>.mins`: fp16 [N, K / 32], d and m of each block.
Nothing is rounded: the fp32 weight is exactly scales * qweight + mins, block by block. The conversion
into the GGUF cache entry writes them once (`write_blocks`); later starts read them (`iter_blocks`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensorjet.models.gguf_names import hf_name, hf_rows
from tensorjet.models.gguf_reader import GGUFFile
from tensorjet.quant.gguf import FOUR_BIT_TYPES, GROUP

BLOCKS_FILE = "gguf_blocks.safetensors"
_TYPES_KEY = "gguf_types"  # safetensors metadata: {HF module: GGUF type} of every tensor in the file


def unpack_block_rows(data: np.ndarray, type_name: str, columns: int) -> dict[str, torch.Tensor]:
    """Rows of Q4_0/Q4_1 blocks ([N, blocks * bytes] uint8, as a GGUF tensor's data) -> the codes, scales
    and minimums of `BLOCKS_FILE` (see the module docstring)."""
    if type_name not in FOUR_BIT_TYPES:
        raise ValueError(f"GGUF block type {type_name} is not a 4-bit type ({sorted(FOUR_BIT_TYPES)})")
    if columns % GROUP:
        raise ValueError(f"a row of {columns} weights is not whole blocks of {GROUP}")
    rows, groups, size = data.shape[0], columns // GROUP, FOUR_BIT_TYPES[type_name]
    blocks = torch.from_numpy(np.ascontiguousarray(data).reshape(rows, groups, size).copy())
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    if type_name == "Q4_1":
        mins, packed = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0], blocks[..., 4:]
    else:
        mins, packed = scales * -8, blocks[..., 2:]  # exact: a power of two in fp16's range
    # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high one.
    codes = torch.cat((packed & 0xF, packed >> 4), dim=-1).reshape(rows, columns)
    return {"qweight": codes, "scales": scales.contiguous(), "mins": mins.contiguous()}


def type_name(ggml_type: int) -> str:
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


def tensor_types(gguf: GGUFFile) -> dict[str, str]:
    """{HF module name: GGUF tensor type (`F32`, `Q4_1`, `Q8_0`, ...)} of every tensor of a parsed GGUF."""
    return {hf_name(t.name).removesuffix(".weight"): type_name(t.ggml_type) for t in gguf.tensors}


def hf_blocks(gguf: GGUFFile, config: Mapping[str, Any]) -> Iterator[tuple[str, str, dict]]:
    """(HF module name, block type, its `unpack_block_rows` parts) of every 4-bit tensor of a GGUF
    (`config`: `gguf_names.rope_settings` of its HF config)."""
    for tensor in gguf.tensors:
        kind = type_name(tensor.ggml_type)
        if kind not in FOUR_BIT_TYPES:
            continue
        name = hf_name(tensor.name).removesuffix(".weight")
        rows, columns = tensor.shape
        parts = unpack_block_rows(gguf.raw(tensor), kind, columns)
        yield name, kind, {key: hf_rows(name, value, config) for key, value in parts.items()}


def write_blocks(file: Path, gguf: GGUFFile, config: Mapping[str, Any]) -> None:
    """`BLOCKS_FILE` of a parsed GGUF: every 4-bit tensor's parts, and every tensor's type."""
    from safetensors.torch import save_file

    tensors = {
        f"{name}.{key}": value for name, _, parts in hf_blocks(gguf, config) for key, value in parts.items()
    }
    save_file(tensors, str(file), metadata={_TYPES_KEY: json.dumps(tensor_types(gguf))})


def stored_tensor_types(file: Path) -> dict[str, str]:
    """`tensor_types` of the GGUF that `file` (a `BLOCKS_FILE`) was written from."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(_TYPES_KEY, "{}"))


def iter_blocks(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The parts in `file`, named `<module>.qweight`, `.scales`, `.mins`, memory-mapped."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)
