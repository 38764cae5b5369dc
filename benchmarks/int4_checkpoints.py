"""INT4 weight-only (W4A16) checkpoints of the tiny test Llama, made by llmcompressor, plus the same
quantized weights written in AutoAWQ's GEMM format and in GPTQ's v1 format.

llmcompressor (compressed-tensors `pack-quantized`, group size 32 to fit the tiny model's 64-wide K):
  w4a16-gptq  GPTQModifier, symmetric, group 32, activation order "weight" (compressed-tensors 0.19 has
              no g_idx: its groups stay contiguous)
  w4a16-awq   AWQModifier + QuantizationModifier, asymmetric (a zero point per group), group 32
  w4a16-rtn   QuantizationModifier, symmetric, one scale per output channel (round to nearest)
Converted (the same codes, scales and zero points; no new quantization):
  awq-gemm    w4a16-awq as AutoAWQ writes it: qweight [K, N/8] in AWQ's interleaved order, qzeros,
              fp16 scales, `quant_method: awq, version: gemm`
  gptq        w4a16-gptq as AutoGPTQ writes it (v1): qweight [K/8, N], qzeros holding zero point - 1,
              fp16 scales, g_idx, `quant_method: gptq, desc_act: false, sym: true`
Made here (no tool writes act order on the CPU any more):
  gptq-act-order  GPTQ v1 with `desc_act: true`: each layer's columns are grouped in a seeded random
              order shared by the layers that read the same input (q|k|v, gate|up), as GPTQ's act order
              groups them in its Hessian's order, and rounded to the nearest code per group (symmetric,
              GPTQ's scale 2 max|w| / 15, zero point 8); g_idx maps each column to its group. Its
              reference logits are transformers' on llama-tiny with every weight replaced by the one the
              published GPTQ unpacking gives.

AutoAWQ and GPTQModel need CUDA to install, so the last two are converted with
`tensorjet/quant/int4_packing.py`, and each converted checkpoint is checked by unpacking it with the
formats' published unpacking code (restated in `awq_published_dequantize` / `gptq_published_dequantize`)
against compressed-tensors' own dequantization of the source: every weight must be equal.

Run in llmcompressor's virtualenv (the one-line setup is in benchmarks/llmcompressor_checkpoints.py), from
the repository root; it reads tests/data/quantized/llama-tiny and writes beside it, with
reference_logits/<name>.safetensors for each llmcompressor checkpoint (transformers' fp32 logits):
    /tmp/lcvenv/bin/python benchmarks/int4_checkpoints.py --text ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmcompressor_checkpoints import (  # noqa: E402
    DEFAULT_TEXT,
    FIXTURE_DIR,
    REPO_ROOT,
    TINY_NUM_SAMPLES,
    TINY_SEQ_LEN,
    byte_tokenizer,
    calibration_dataset,
    keep_fixture_files,
    seed_everything,
    write_reference_logits,
)

SCHEMES = ("w4a16-gptq", "w4a16-awq", "w4a16-rtn")
GROUP_SIZE = 32
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _packing():
    """tensorjet's packing helpers, loaded by path: this virtualenv has no Triton for tensorjet itself."""
    path = REPO_ROOT / "tensorjet" / "quant" / "int4_packing.py"
    spec = importlib.util.spec_from_file_location("int4_packing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_recipe(scheme: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    def int4(symmetric: bool, strategy: str, **extra) -> dict:
        group = {"group_size": GROUP_SIZE} if strategy == "group" else {}
        args = QuantizationArgs(
            num_bits=4, type="int", symmetric=symmetric, strategy=strategy, **group, **extra
        )
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    if scheme == "w4a16-gptq":
        groups = int4(True, "group", actorder="weight")
        return GPTQModifier(config_groups=groups, ignore=["lm_head"])
    if scheme == "w4a16-awq":
        groups = int4(False, "group")
        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if scheme == "w4a16-rtn":
        return QuantizationModifier(config_groups=int4(True, "channel"), ignore=["lm_head"])
    raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def quantize(source: Path, out_dir: Path, scheme: str, text_path: Path) -> None:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _skip_pinning_without_a_gpu()
    seed_everything(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=build_recipe(scheme),
        dataset=calibration_dataset(tokenizer, text_path, TINY_NUM_SAMPLES, TINY_SEQ_LEN),
        num_calibration_samples=TINY_NUM_SAMPLES,
        max_seq_length=TINY_SEQ_LEN,
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)


def _skip_pinning_without_a_gpu() -> None:
    """llmcompressor 0.14's AWQ pins its activation cache in page-locked memory for faster copies to the
    GPU, which raises where there is none; pinning changes no value, so without a GPU it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


# ---- reading a compressed-tensors checkpoint with compressed-tensors' own code -------------------


def compressed_tensors_layers(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per quantized module: its codes [N, K] (0..15), scales [N, groups], zero points [N, groups]
    (8 where symmetric) and the dequantized weight, all by compressed-tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**config["config_groups"]["group_0"]["weights"])
    tensors = load_file(checkpoint / "model.safetensors")
    layers = {}
    for name in [n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")]:
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        signed = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, shape)
        scale = tensors[f"{name}.weight_scale"]
        zero = tensors.get(f"{name}.weight_zero_point")
        if zero is not None:
            zero = unpack_from_int32(zero, 4, (shape[0], scale.shape[1]), packed_dim=0)
        weight = dequantize(signed, scale.float(), zero, args=args)  # fp32: exact
        zeros = (zero.to(torch.int32) if zero is not None else torch.zeros_like(scale, dtype=torch.int32)) + 8
        layers[name] = dict(codes=(signed.to(torch.int32) + 8), scales=scale, zeros=zeros, weight=weight)
    return layers


# ---- the formats' published unpacking, restated as a check ----------------------------------------


def awq_published_dequantize(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """AutoAWQ's `dequantize_gemm` (awq/utils/packing_utils.py): unpack along N, undo AWQ's order with
    AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7], then (w - z) * s per group. Returns [K, N]."""
    shifts = torch.arange(0, 32, 4)
    reverse = torch.arange(qweight.shape[1] * 8).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)

    def unpack(words):
        values = (words[:, :, None] >> shifts[None, None, :]).to(torch.int8).view(words.shape[0], -1)
        return values[:, reverse] & 15

    weights, zeros = unpack(qweight), unpack(qzeros)
    scales = scales.repeat_interleave(group_size, dim=0)
    zeros = zeros.repeat_interleave(group_size, dim=0)
    return (weights - zeros) * scales


def gptq_published_dequantize(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """AutoGPTQ's CUDA-old QuantLinear forward without kernels (v1): qweight unpacked along K, qzeros
    along N plus one, w = s[g_idx] * (q - z[g_idx]). Returns [K, N]."""
    wf = torch.arange(0, 32, 4, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 8), wf.unsqueeze(0)).to(torch.int8)
    zeros = ((zeros + 1) & 15).reshape(qzeros.shape[0], -1)
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 8, -1), wf.unsqueeze(-1)).to(
        torch.int8
    )
    weight = (weight & 15).reshape(-1, qweight.shape[1])
    return scales[g_idx.long()] * (weight - zeros[g_idx.long()])


# ---- conversion -----------------------------------------------------------------------------------


def convert(source: Path, out_dir: Path, kind: str) -> None:
    """Write `source` (compressed-tensors) as an AutoAWQ GEMM (`kind` "awq-gemm") or GPTQ v1 ("gptq")
    checkpoint, and check every layer against compressed-tensors' dequantization."""
    from safetensors.torch import load_file

    packing = _packing()
    layers = compressed_tensors_layers(source)
    tensors = {
        name: t
        for name, t in load_file(source / "model.safetensors").items()
        if name.rsplit(".", 1)[0] not in layers
    }
    for name, layer in layers.items():
        codes, zeros = layer["codes"], layer["zeros"]
        scales = layer["scales"].to(torch.float16)
        if not torch.equal(scales.to(layer["scales"].dtype), layer["scales"]):
            raise ValueError(f"{name}: scales do not convert to fp16 exactly")
        if kind == "awq-gemm":
            qweight = packing.pack_awq(codes.T)
            qzeros = packing.pack_awq(zeros.T)
            tensors |= {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales.T}
            theirs = awq_published_dequantize(qweight, qzeros, scales.T.float(), GROUP_SIZE)
        else:
            g_idx = (torch.arange(codes.shape[1]) // GROUP_SIZE).to(torch.int32)
            qweight = packing.pack_gptq_weight(codes)
            qzeros = packing.pack_gptq_zeros(zeros, v1=True)
            tensors |= {
                f"{name}.qweight": qweight,
                f"{name}.qzeros": qzeros,
                f"{name}.scales": scales.T.contiguous(),
                f"{name}.g_idx": g_idx,
            }
            theirs = gptq_published_dequantize(qweight, qzeros, scales.T.float(), g_idx)
        if not torch.equal(theirs.T.float(), layer["weight"].float()):
            raise ValueError(f"{name}: the {kind} checkpoint does not dequantize to the source's weights")
    quantization_config = (
        {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm",
         "modules_to_not_convert": ["lm_head"]}
        if kind == "awq-gemm"
        else gptq_config(desc_act=False)
    )  # fmt: skip
    write_checkpoint(out_dir, source / "config.json", tensors, quantization_config)


def gptq_config(desc_act: bool) -> dict:
    return dict(
        quant_method="gptq",
        bits=4,
        group_size=GROUP_SIZE,
        desc_act=desc_act,
        sym=True,
        static_groups=False,
        true_sequential=True,
        damp_percent=0.01,
        checkpoint_format="gptq",
    )


def write_checkpoint(out_dir: Path, config_json: Path, tensors: dict, quantization_config: dict) -> None:
    from safetensors.torch import save_file

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tensors = {name: t.contiguous() for name, t in sorted(tensors.items())}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads(config_json.read_text())
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- GPTQ with act order --------------------------------------------------------------------------

# The modules that read one input, and so share one column order.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def make_act_order_gptq(source: Path, out_dir: Path, reference: Path) -> None:
    """The GPTQ act-order fixture and its reference logits (see the module docstring)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    packing = _packing()
    generator = torch.Generator().manual_seed(0)
    tensors = load_file(source / "model.safetensors")
    dequantized = {}
    for layer in sorted({".".join(n.split(".")[:3]) for n in tensors if n.startswith("model.layers.")}):
        for modules in SHARED_INPUT:
            prefix = f"{layer}.{'self_attn' if modules[0].endswith(('q_proj', 'o_proj')) else 'mlp'}"
            k = tensors[f"{prefix}.{modules[0]}.weight"].shape[1]
            order = torch.randperm(k, generator=generator)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[order] = (torch.arange(k) // GROUP_SIZE).to(torch.int32)
            for module in modules:
                name = f"{prefix}.{module}"
                weight = tensors.pop(f"{name}.weight").float()
                codes, scales = _round_to_nearest(weight, g_idx)
                qweight = packing.pack_gptq_weight(codes)
                qzeros = packing.pack_gptq_zeros(torch.full_like(scales, 8, dtype=torch.int32), v1=True)
                tensors |= {
                    f"{name}.qweight": qweight,
                    f"{name}.qzeros": qzeros,
                    f"{name}.scales": scales.T.to(torch.float16),
                    f"{name}.g_idx": g_idx.clone(),
                }
                theirs = gptq_published_dequantize(qweight, qzeros, scales.T.to(torch.float16).float(), g_idx)
                dequantized[f"{name}.weight"] = theirs.T.contiguous()
    write_checkpoint(out_dir, source / "config.json", tensors, gptq_config(desc_act=True))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.load_state_dict(dequantized, strict=False)
    from llmcompressor_checkpoints import REFERENCE_PROMPT

    input_ids = torch.tensor([list(REFERENCE_PROMPT.encode())])
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()
    producer = "transformers fp32 on GPTQ's published dequantization of the checkpoint"
    save_file(
        {"input_ids": input_ids[0], "logits": logits.contiguous()}, reference, metadata={"producer": producer}
    )


def _round_to_nearest(weight: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit codes [N, K] and fp16-exact scales [N, groups] of the columns grouped by g_idx."""
    groups = int(g_idx.max()) + 1
    absmax = torch.stack([weight[:, g_idx == g].abs().amax(1) for g in range(groups)], 1)
    scales = (2 * absmax / 15).clamp(min=1e-8).to(torch.float16).float()
    codes = torch.clamp(torch.round(weight / scales[:, g_idx.long()]) + 8, 0, 15).to(torch.int32)
    return codes, scales


CONVERSIONS = {"awq-gemm": "w4a16-awq", "gptq": "w4a16-gptq"}
ACT_ORDER = "llama-tiny-gptq-act-order"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration text file")
    parser.add_argument(
        "--convert-only", action="store_true", help="only the conversions, from the llmcompressor fixtures"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "llama-tiny"
        shutil.copytree(FIXTURE_DIR / "llama-tiny", source)
        byte_tokenizer().save_pretrained(source)
        for scheme in () if args.convert_only else SCHEMES:
            out = Path(tmp) / scheme
            quantize(source, out, scheme, args.text)
            keep_fixture_files(out, FIXTURE_DIR / f"llama-tiny-{scheme}")
            write_reference_logits(out, FIXTURE_DIR / "reference_logits" / f"llama-tiny-{scheme}.safetensors")
        for kind, scheme in CONVERSIONS.items():
            convert(FIXTURE_DIR / f"llama-tiny-{scheme}", FIXTURE_DIR / f"llama-tiny-{kind}", kind)
        make_act_order_gptq(
            source, FIXTURE_DIR / ACT_ORDER, FIXTURE_DIR / "reference_logits" / f"{ACT_ORDER}.safetensors"
        )
    for path in sorted(FIXTURE_DIR.glob("llama-tiny-*/*")):
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
