"""Where FP8 W8A8's perplexity cost comes from: the engine's `dtype="fp8"` model scored as it runs, with
its activations left unquantized (the weights' E4M3 rounding alone), and with one projection type's
activations left unquantized at a time, beside the fp32 model. Same text and windows as
`benchmarks/quant_accuracy.py` (`tensorjet.eval.perplexity`); CPU or GPU.

A row leaves activations unquantized by giving that projection's FP8 method a product over the same
E4M3 weights and scales with x as it is (no per-token rounding); everything else is the engine's.

    python benchmarks/fp8_error_sources.py [DATA] [--max_chars 100000] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from tensorjet import LLM
from tensorjet.eval.perplexity import perplexity
from tensorjet.layers.linear import Linear
from tensorjet.quant.fp8 import Fp8LinearMethod

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def weight_only_product(x, weight, weight_scale, bias=None, input_scale=None) -> torch.Tensor:
    """The FP8 product with x unquantized: x @ (weight * weight_scale)^T in fp32, in x's dtype."""
    y = (x.float() @ weight.float().T) * weight_scale[None, :]
    return (y if bias is None else y + bias.float()).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--max_chars", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    text = args.data.read_text()

    def score(llm: LLM) -> float:
        return perplexity(llm, text, max_chars=args.max_chars, use_tqdm=False).perplexity

    reference = LLM(args.model, dtype="float32", device=args.device)
    rows = {"fp32": score(reference)}
    reference.shutdown()
    llm = LLM(args.model, dtype="fp8", device=args.device)
    layers = [(n, m) for n, m in llm.engine.runner.model.named_modules() if isinstance(m, Linear)]
    layers = [(n, m) for n, m in layers if isinstance(m.method, Fp8LinearMethod)]
    engine_kernels = {n: m.method.kernels for n, m in layers}
    float_activations = {"W8A8 (the engine)": (), "weights only (no activation rounding)": PROJECTIONS}
    float_activations |= {f"W8A8, {p} activations unrounded": (p,) for p in PROJECTIONS}
    for row, projections in float_activations.items():
        for name, layer in layers:
            kernels = engine_kernels[name]
            if name.rsplit(".", 1)[-1] in projections:
                kernels = replace(kernels, dense=weight_only_product, small_batch=None, mid_batch=None)
            layer.method.kernels = kernels
        rows[row] = score(llm)
        print(f"{row:42} {rows[row]:8.3f}", flush=True)
    llm.shutdown()

    base = rows["fp32"]
    print(f"\nperplexity, first {args.max_chars:,} characters of {args.data.name}, {args.device}")
    for row, ppl in rows.items():
        print(f"{row:42} {ppl:8.3f}  {100 * (ppl / base - 1):+6.2f}%")
    if args.json:
        config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
