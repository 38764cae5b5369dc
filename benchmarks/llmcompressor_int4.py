"""llmcompressor's GPTQ and AWQ (W4A16) of a Hugging Face model directory, calibrated on
given token ids: the peers of tensorjet's own calibration in benchmarks/quant_accuracy.py, which writes
the token ids (the same samples its own methods calibrate on) and runs this script.

  gptq  GPTQModifier, W4A16 symmetric in groups of --group_size (default 128, the W4A16 preset's), its
        defaults (static act order, 1% damping, blocks of 128 columns)
  awq   AWQModifier (its defaults: duo scaling, 20 grid points) then QuantizationModifier, W4A16
        asymmetric (a zero point per group; the W4A16_ASYM preset's)
Both leave lm_head unquantized. llmcompressor 0.14 needs the group size to divide every layer's input
width (its weight observer cannot make a narrower last group). Writes OUT/llmcompressor-<method>-g<group>/
(compressed-tensors W4A16) and prints
one JSON object: {method: {"seconds": oneshot's time, "path": ...}}.

Run in llmcompressor's virtualenv (the one-line setup is in benchmarks/llmcompressor_checkpoints.py):
    /tmp/lcvenv/bin/python benchmarks/llmcompressor_int4.py --source HF_DIR --token_ids IDS.json \
        --output_dir OUT [--methods gptq awq] [--group_size 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_checkpoints import _skip_pinning_without_a_gpu  # noqa: E402
from llmcompressor_checkpoints import seed_everything  # noqa: E402

METHODS = ("gptq", "awq")


def build_recipe(method: str, group_size: int):
    """W4A16 in groups of `group_size` (the W4A16 / W4A16_ASYM presets but for the group size)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    def w4a16(symmetric: bool) -> dict:
        args = QuantizationArgs(
            num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size
        )
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    if method == "gptq":
        return GPTQModifier(config_groups=w4a16(symmetric=True), ignore=["lm_head"])
    if method == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups=w4a16(symmetric=False), ignore=["lm_head"])]
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def quantize(source: Path, out_dir: Path, method: str, group_size: int, token_ids: list[list[int]]) -> float:
    """Quantizes `source` with `method` into `out_dir`; returns the seconds oneshot took."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _skip_pinning_without_a_gpu()
    seed_everything(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    num_samples, seq_len = len(token_ids), len(token_ids[0])
    dataset = Dataset.from_dict({"input_ids": token_ids, "attention_mask": [[1] * seq_len] * num_samples})
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=build_recipe(method, group_size),
        dataset=dataset,
        num_calibration_samples=num_samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--token_ids", type=Path, required=True, help="JSON: [samples][seq_len] token ids")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--group_size",
        type=int,
        default=128,
        help="must divide every layer's input width (llmcompressor 0.14)",
    )
    args = parser.parse_args()
    token_ids = json.loads(args.token_ids.read_text())
    results = {}
    for method in args.methods:
        out = args.output_dir / f"llmcompressor-{method}-g{args.group_size}"
        seconds = quantize(args.source, out, method, args.group_size, token_ids)
        results[method] = {"seconds": round(seconds, 1), "path": str(out)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
