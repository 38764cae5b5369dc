"""FP8 checkpoints made by NVIDIA ModelOpt's unified Hugging Face export (the format of nvidia/*-FP8 models).

Schemes (ModelOpt's presets; per-tensor weight and static per-tensor input scales, max calibration):
  modelopt-fp8     mtq.FP8_DEFAULT_CFG
  modelopt-fp8-kv  mtq.FP8_DEFAULT_CFG plus mtq.FP8_KV_CFG (FP8 KV cache: k_scale / v_scale per layer)

Calibration text and tokenization are shared with benchmarks/llmcompressor_checkpoints.py. ModelOpt pins
its own transformers (<5.15 for its Hugging Face support), so this runs in a separate virtualenv, made with
one line:
    python3 -m venv /tmp/movenv && /tmp/movenv/bin/pip install nvidia-modelopt==0.47.0 torch==2.13.0 \
        transformers==5.14.1 accelerate requests

Quantize a Hugging Face model directory (writes OUT/<prefix>-<scheme>/: config.json, hf_quant_config.json,
safetensors and the tokenizer files):
    /tmp/movenv/bin/python benchmarks/modelopt_checkpoints.py --source HF_DIR --output-dir OUT \
        --prefix smollm2

Regenerate the ModelOpt test fixtures in tests/data/quantized/ from the committed tiny Llama
(tests/data/quantized/llama-tiny, written by llmcompressor_checkpoints.py --tiny), each with
reference_logits/<name>.safetensors (ModelOpt's fp32 fake-quantized logits for a fixed prompt):
    /tmp/movenv/bin/python benchmarks/modelopt_checkpoints.py --tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from llmcompressor_checkpoints import (  # benchmarks/ is on the path when this runs as a script
    DEFAULT_TEXT,
    FIXTURE_DIR,
    REFERENCE_PROMPT,
    REPO_ROOT,
    SEED,
    TINY_NUM_SAMPLES,
    TINY_SEQ_LEN,
    byte_tokenizer,
    calibration_token_ids,
    seed_everything,
)

SCHEMES = ("modelopt-fp8", "modelopt-fp8-kv")


def quant_config(scheme: str) -> dict:
    import modelopt.torch.quantization as mtq

    if scheme == "modelopt-fp8":
        return mtq.FP8_DEFAULT_CFG
    if scheme == "modelopt-fp8-kv":
        return mtq.update_quant_cfg_with_kv_cache_quant(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG["quant_cfg"])
    raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def calibrate(source: Path, scheme: str, tokenizer, text_path: Path, num_samples: int, seq_len: int):
    """`source` loaded in its own dtype, with ModelOpt's quantizers inserted and calibrated."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    seed_everything(SEED)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    samples = [
        torch.tensor([ids]) for ids in calibration_token_ids(tokenizer, text_path, num_samples, seq_len)
    ]

    def forward_loop(calibrated_model: torch.nn.Module) -> None:
        for input_ids in samples:
            calibrated_model(input_ids)

    with torch.no_grad():
        return mtq.quantize(model, quant_config(scheme), forward_loop)


def export(model: torch.nn.Module, out_dir: Path) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    if not model.config.architectures:
        # The export reads it (to tell language models from multimodal ones); configs converted from
        # other formats may lack it.
        model.config.architectures = [type(model).__name__]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out_dir))


def write_reference_logits(model: torch.nn.Module, checkpoint: Path, dst: Path) -> None:
    """ModelOpt's own fake-quantized forward in fp32 on the exported FP8 weights, for a fixed byte prompt.

    transformers cannot run a ModelOpt checkpoint (it would load the FP8 weights without their scales), so
    the reference is the calibrated model itself: its input and KV quantizers as calibrated, its weights
    replaced by the checkpoint's dequantized FP8 weights (ModelOpt's export rounds W / scale in the model
    dtype, its fake quantizer in fp32, so the two can differ by one FP8 step)."""
    import modelopt
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "model.safetensors")
    reference = copy.deepcopy(model).float()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if f"{name}.weight_scale" in tensors:
                scale = tensors[f"{name}.weight_scale"].float()
                module.weight.copy_(tensors[f"{name}.weight"].float() * scale)
                module.weight_quantizer.disable()
        input_ids = torch.tensor([list(REFERENCE_PROMPT.encode())])
        logits = reference(input_ids).logits[0].float()
    producer = f"modelopt {modelopt.__version__} fake-quantized forward on the exported weights, fp32"
    save_file(
        {"input_ids": input_ids[0], "logits": logits.contiguous()}, dst, metadata={"producer": producer}
    )


def quantize(
    source: Path, out_dir: Path, scheme: str, tokenizer, text_path: Path, num_samples: int, seq_len: int
) -> float:
    """Calibrates `source` with `scheme` and exports it to `out_dir`; returns the seconds calibration took."""
    start = time.perf_counter()
    model = calibrate(source, scheme, tokenizer, text_path, num_samples, seq_len)
    seconds = time.perf_counter() - start
    export(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    return seconds


def make_tiny_fixtures(text_path: Path, work_dir: Path) -> None:
    for scheme in SCHEMES:
        out = work_dir / scheme
        start = time.perf_counter()
        model = calibrate(
            FIXTURE_DIR / "llama-tiny", scheme, byte_tokenizer(), text_path, TINY_NUM_SAMPLES, TINY_SEQ_LEN
        )
        seconds = time.perf_counter() - start
        export(model, out)
        fixture = FIXTURE_DIR / f"llama-tiny-{scheme}"
        if fixture.exists():
            shutil.rmtree(fixture)
        fixture.mkdir(parents=True)
        # hf_quant_config.json is ModelOpt's own description of the checkpoint, which loaders also read.
        for name in ("config.json", "hf_quant_config.json", "model.safetensors"):
            shutil.copy(out / name, fixture / name)
        write_reference_logits(
            model, out, FIXTURE_DIR / "reference_logits" / f"llama-tiny-{scheme}.safetensors"
        )
        print(f"llama-tiny-{scheme}: calibration {seconds:.1f} s")
    for path in sorted(FIXTURE_DIR.glob("llama-tiny-modelopt-*/*")):
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="regenerate the ModelOpt fixtures in tests/data")
    parser.add_argument("--source", type=Path, help="Hugging Face model directory to quantize")
    parser.add_argument("--output-dir", type=Path, help="parent directory of the checkpoints written")
    parser.add_argument("--prefix", help="checkpoint directory prefix (default: the source directory name)")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration text file")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    args = parser.parse_args()

    if args.tiny:
        with tempfile.TemporaryDirectory() as tmp:
            make_tiny_fixtures(args.text, Path(tmp))
        return
    if args.source is None or args.output_dir is None:
        parser.error("--source and --output-dir are required unless --tiny is given")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.source)
    prefix = args.prefix or args.source.name
    timings = {}
    for scheme in args.schemes:
        out = args.output_dir / f"{prefix}-{scheme}"
        start = time.perf_counter()
        seconds = quantize(args.source, out, scheme, tokenizer, args.text, args.num_samples, args.seq_len)
        timings[scheme] = {
            "calibration_s": round(seconds, 1),
            "total_s": round(time.perf_counter() - start, 1),
        }
        print(f"{out}: {json.dumps(timings[scheme])}")
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
