"""`tensorjet quantize MODEL --method awq|gptq|rtn --output DIR`: calibrate a float model and write an
INT4 checkpoint. `register(subparsers)` adds it to tensorjet's parser."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tensorjet.calibration.checkpoint import CHECKPOINT_FORMATS, symmetric
from tensorjet.calibration.data import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, calibration_samples
from tensorjet.calibration.pipeline import METHODS, CalibrationOptions
from tensorjet.calibration.quantize import (
    DEFAULT_FORMATS,
    CalibrationJob,
    quantize_to_checkpoint,
    require_float,
)
from tensorjet.calibration.quantizer import QuantScheme
from tensorjet.config import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="calibrate a float model to INT4 (AWQ, GPTQ or round-to-nearest) and write a checkpoint",
        description="Calibrate a float model's decoder-layer projections to 4-bit weights, layer by layer "
        "on the GPU when there is one (else the CPU), and write an AutoAWQ GEMM or GPTQ checkpoint with "
        "its quantization_config and the tokenizer, which tensorjet loads (quantization='awq' / 'gptq').",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a local HF directory, .gguf file or cached hub id; default: the bundled model",
    )
    _flag(
        parser,
        "method",
        required=True,
        choices=METHODS,
        help="awq, gptq, or rtn (round-to-nearest, the baseline)",
    )
    _flag(parser, "output", type=Path, required=True, help="the checkpoint directory to write (new or empty)")
    _flag(
        parser,
        "format",
        choices=CHECKPOINT_FORMATS,
        default=None,
        help="awq (AutoAWQ GEMM, zero points) or gptq (GPTQ v1, symmetric); default: awq for awq, "
        "gptq otherwise",
    )
    _flag(parser, "bits", type=int, default=4, help="weight bits (4)")
    _flag(
        parser,
        "group_size",
        type=int,
        default=128,
        help="input columns per scale: a multiple of 8, or -1 (per channel)",
    )
    _flag(
        parser,
        "calibration_data",
        type=Path,
        default=None,
        help="a UTF-8 text file; default: the text shipped with tensorjet (Shakespeare, public domain)",
    )
    _flag(
        parser,
        "num_samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        help=f"calibration samples (default {DEFAULT_NUM_SAMPLES})",
    )
    _flag(
        parser,
        "seq_len",
        type=int,
        default=None,
        help=f"tokens per sample (default {DEFAULT_SEQ_LEN}, or the model's positions if fewer)",
    )
    _flag(parser, "device", default="auto", help="auto (CUDA when visible, else CPU), cpu, cuda or cuda:N")
    _flag(
        parser,
        "dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="the model's dtype while calibrating (default: bf16 on GPU, fp32 on CPU)",
    )
    parser.set_defaults(func=quantize_command)


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """A flag spelled with underscores (`--group_size`) or dashes (`--group-size`)."""
    dashed = [f"--{name.replace('_', '-')}"] if "_" in name else []
    parser.add_argument(f"--{name}", *dashed, **kwargs)


def quantize_command(args: argparse.Namespace) -> int:
    """Bad input ends with a message naming the flag and exit code 2."""
    try:
        run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    from tensorjet.models.llama import max_positions_of
    from tensorjet.models.loader import load_tokenizer, resolve_model

    checkpoint_format = args.format or DEFAULT_FORMATS[args.method]
    scheme = QuantScheme(args.bits, args.group_size, symmetric=symmetric(checkpoint_format))
    options = CalibrationOptions(args.method, scheme)
    _check_output(args.output)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = resolve_model(args.model)
    require_float(source)
    max_positions = max_positions_of(source.hf_config)
    seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, max_positions)
    if args.method == "rtn":  # rounds the weights alone: no samples
        token_ids = torch.empty(0, seq_len, dtype=torch.int64)
    else:
        token_ids = calibration_samples(
            load_tokenizer(source), args.num_samples, seq_len, args.calibration_data, max_positions
        )
    job = CalibrationJob(source, options, checkpoint_format, token_ids, device, dtype)
    result = quantize_to_checkpoint(job, args.output)
    size = sum(f.stat().st_size for f in args.output.iterdir() if f.is_file())
    data = "no calibration data" if args.method == "rtn" else f"{args.num_samples} x {seq_len} tokens"
    print(
        f"{args.method} ({checkpoint_format} format, {args.bits}-bit, group {args.group_size}) of "
        f"{source.name}: {data}, {result.seconds:.1f} s on {device}; wrote {args.output} "
        f"({size / 2**20:.1f} MiB)"
    )


def _check_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output {str(path)!r} exists and is not an empty directory")
