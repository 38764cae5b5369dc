"""FP8 weights against bf16 weights on one GPU, in one run: Llama-3-8B shapes, dummy weights (the
parts: `benchmarks/weight_formats.py`). FP8 is `dtype="fp8"`: E4M3 weights with per-channel scales,
activations quantized per token, the LM head and embeddings in bf16.

    python benchmarks/fp8_gpu.py [--model meta-llama/Meta-Llama-3-8B] [--requests 1000] [--out FILE]
    python benchmarks/fp8_gpu.py --model meta-llama/Meta-Llama-3-70B --only fp8 --skip_bench

The second line runs the 70B model in FP8 alone (it fits one 141 GB H200; in bf16 it does not) and
reports its peak memory. `--skip_bench` / `--bench_only` split the run into two calls.
"""

from __future__ import annotations

import argparse

from weight_formats import add_arguments, print_table, run

FORMATS = {"bf16": "bfloat16", "fp8": "fp8"}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, FORMATS, out="benchmarks/results/fp8_gpu.json")
    args = parser.parse_args()
    print_table(run(args, FORMATS), "FP8 vs bf16 weights", args.in_out)


if __name__ == "__main__":
    main()
