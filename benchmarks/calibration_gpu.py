"""Calibration time of tensorjet's AWQ and GPTQ for a Llama-3-8B-shaped model with random weights:
128 samples x 512 tokens (AutoAWQ's and `tensorjet quantize`'s default), layer by layer on the GPU,
the model in host memory. Reports, per method, the calibration's seconds (the model built and its
random weights made before the clock starts; no checkpoint written), seconds per layer and the GPU's
peak memory, against a 10-minute budget.

Random weights and random token ids calibrate like real ones for time: every method runs the same
products and searches whatever the values.

    python benchmarks/calibration_gpu.py [--model llama-3-8b] [--methods awq gptq] [--num_samples 128]
        [--seq_len 512] [--device cuda] [--dtype bfloat16] [--out FILE.json]
    python benchmarks/calibration_gpu.py --tiny --device cpu    # a smoke run of the same code on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from tensorjet.calibration.checkpoint import symmetric
from tensorjet.calibration.pipeline import CalibrationOptions
from tensorjet.calibration.quantize import DEFAULT_FORMATS, CalibrationJob, calibrate_source
from tensorjet.calibration.quantizer import QuantScheme
from tensorjet.config import DTYPES
from tensorjet.models.loader import ModelSource, resolve_model

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 600
# A tiny Llama for the CPU smoke run: the same code paths (GQA, grouped scales) at toy sizes.
TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def model_source(args: argparse.Namespace) -> ModelSource:
    if args.tiny:
        config = transformers.LlamaConfig(**TINY)
        return ModelSource("tiny llama (random)", "dummy", ROOT, config, None)
    return resolve_model(args.model, load_format="dummy")


def run(method: str, source: ModelSource, args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    checkpoint_format = DEFAULT_FORMATS[method]
    options = CalibrationOptions(
        method, QuantScheme(4, args.group_size, symmetric=symmetric(checkpoint_format))
    )
    generator = torch.Generator().manual_seed(0)
    vocab = source.hf_config.vocab_size
    token_ids = torch.randint(0, vocab, (args.num_samples, args.seq_len), generator=generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    calibrated = calibrate_source(
        CalibrationJob(source, options, checkpoint_format, token_ids, device, dtype)
    )
    total = time.perf_counter() - start
    layers = source.hf_config.num_hidden_layers
    result = {
        "method": method,
        "format": checkpoint_format,
        "calibration_s": round(calibrated.seconds, 2),
        "per_layer_s": round(calibrated.seconds / layers, 3),
        "model_build_s": round(total - calibrated.seconds, 2),
        "within_budget": calibrated.seconds < BUDGET_SECONDS,
    }
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del calibrated
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-3-8b", help="a dummy preset (random weights)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (CPU smoke run)")
    parser.add_argument("--methods", nargs="+", choices=("awq", "gptq", "rtn"), default=["awq", "gptq"])
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--group_size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / f"calibration_gpu-{datetime.date.today().isoformat()}.json",
    )
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    source = model_source(args)
    print(
        f"{source.name}: {source.hf_config.num_hidden_layers} layers, {args.num_samples} x {args.seq_len} "
        f"tokens, group {args.group_size}, {args.dtype} on {args.device}",
        flush=True,
    )
    results = []
    for method in args.methods:
        result = run(method, source, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(
        f"\n{'method':<8} {'calibration s':>14} {'s / layer':>10} {'peak GPU GiB':>13}  "
        f"under {BUDGET_SECONDS} s"
    )
    for r in results:
        peak = f"{r['peak_gpu_gib']:.1f}" if "peak_gpu_gib" in r else "-"
        print(
            f"{r['method']:<8} {r['calibration_s']:>14.1f} {r['per_layer_s']:>10.2f} {peak:>13}  "
            f"{r['within_budget']}"
        )
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    )
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": source.name,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "group_size": args.group_size,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
