"""A calibrated model written as a standard INT4 checkpoint: config.json with its
`quantization_config`, model.safetensors, and the tokenizer files.

- "awq": AutoAWQ's GEMM format (asymmetric: a zero point per group): `qweight` [K, N / 8] and `qzeros`
  [groups, N / 8] in AWQ's interleaved packing, fp16 `scales` [groups, N];
- "gptq": GPTQ's v1 format (symmetric, zero point 8, stored minus one): `qweight` [K / 8, N], `qzeros`
  [groups, N / 8], fp16 `scales` [groups, N], `g_idx` [K] (each column's group: contiguous, since act
  order runs with static groups).
Every other tensor (embeddings, norms with AWQ's scales folded in, biases, the LM head) is the model's
own, in its dtype, under its Hugging Face name. Where the group size does not divide a layer's input
width, its last group is narrower and the scales have ceil(K / group_size) rows: tensorjet reads that,
AutoAWQ's and vLLM's kernels do not (they need the group size to divide K).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from tensorjet.calibration.pipeline import CalibrationOptions, projections
from tensorjet.calibration.quantizer import QuantizedWeight
from tensorjet.layers.linear import Linear
from tensorjet.models.llama import LlamaForCausalLM
from tensorjet.models.loader import ModelSource, load_tokenizer
from tensorjet.quant import int4_packing as packing

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("awq", "gptq")
WEIGHTS_FILE = "model.safetensors"
# The checkpoint modules each merged engine module holds, in row order.
_SHARD_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_EXTRA_FILES = ("generation_config.json",)


def symmetric(checkpoint_format: str) -> bool:
    """Whether a format's weights are symmetric (GPTQ's) or carry zero points (AWQ's)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"format={checkpoint_format!r} is not supported; choose one of {CHECKPOINT_FORMATS}")
    return checkpoint_format == "gptq"


def quantization_config(checkpoint_format: str, options: CalibrationOptions) -> dict:
    scheme = options.scheme
    if checkpoint_format == "awq":
        return {
            "quant_method": "awq",
            "version": "gemm",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "zero_point": True,
            "modules_to_not_convert": None,
        }
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": True,
        "desc_act": False,  # act order ran with static groups: the stored groups are contiguous
        "static_groups": options.method == "gptq" and options.act_order,
        "true_sequential": False,
        "damp_percent": options.damp,
        "lm_head": False,
    }


def check_packable(model: LlamaForCausalLM, checkpoint_format: str) -> None:
    """Both formats pack eight codes per word along N (zero points, and AWQ's weights) and GPTQ along K
    too: every module must be that wide. Checked before calibrating."""
    for index, layer in enumerate(model.layers):
        for name, linear in projections(layer).items():
            widths = {"output width": min(linear.output_sizes)}
            if checkpoint_format == "gptq":
                widths["input width"] = linear.input_size
            for what, width in widths.items():
                if width % packing.CODES_PER_WORD:
                    raise ValueError(
                        f"layers.{index}.{name}: its {what} {width} is not a multiple of "
                        f"{packing.CODES_PER_WORD}, which the {checkpoint_format} format packs"
                    )


def write_checkpoint(
    out_dir: Path,
    source: ModelSource,
    model: LlamaForCausalLM,
    quantized: dict[str, QuantizedWeight],
    checkpoint_format: str,
    options: CalibrationOptions,
) -> None:
    """Write `model` (calibrated, in host memory) with its projections as `quantized` into `out_dir`."""
    from safetensors.torch import save_file

    tensors = _checkpoint_tensors(model, quantized, checkpoint_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    config = source.hf_config.to_dict()
    config["quantization_config"] = quantization_config(checkpoint_format, options)
    config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = load_tokenizer(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if source.kind == "hf":
        for name in _EXTRA_FILES:
            if (source.path / name).exists():
                shutil.copy(source.path / name, out_dir / name)


def _checkpoint_tensors(
    model: LlamaForCausalLM, quantized: dict[str, QuantizedWeight], checkpoint_format: str
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    linears = {
        f"layers.{i}.{name}": linear
        for i, layer in enumerate(model.layers)
        for name, linear in projections(layer).items()
    }
    for name, param in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        if module_name in linears:
            linear = linears[module_name]
            for shard_name, rows in _shards(module_name, linear):
                if kind == "weight":
                    tensors |= _packed(shard_name, quantized[module_name].rows(rows), checkpoint_format)
                else:
                    tensors[f"{shard_name}.{kind}"] = param.data[rows]
            continue
        tensors[name if name.startswith("lm_head.") else f"model.{name}"] = param.data
    return {name: t.detach().cpu().contiguous() for name, t in sorted(tensors.items())}


def _shards(module_name: str, linear: Linear) -> list[tuple[str, slice]]:
    """(checkpoint module name, its rows of `linear`) for each checkpoint module the linear holds."""
    parent, _, merged = module_name.rpartition(".")
    names = _SHARD_NAMES.get(merged, (merged,))
    return [
        (f"model.{parent}.{part}", linear.shard_rows(i if len(names) > 1 else None))
        for i, part in enumerate(names)
    ]


def _packed(name: str, weight: QuantizedWeight, checkpoint_format: str) -> dict[str, torch.Tensor]:
    codes, zeros = weight.codes, weight.zeros
    scales = weight.scales.T.to(torch.float16).contiguous()
    if checkpoint_format == "awq":
        return {
            f"{name}.qweight": packing.pack_awq(codes.T),
            f"{name}.qzeros": packing.pack_awq(zeros.T),
            f"{name}.scales": scales,
        }
    return {
        f"{name}.qweight": packing.pack_gptq_weight(codes),
        f"{name}.qzeros": packing.pack_gptq_zeros(zeros, v1=True),
        f"{name}.scales": scales,
        f"{name}.g_idx": weight.g_idx.to(torch.int32),
    }
