"""Accuracy gate for reduced-precision weights and KV cache: the engine's perplexity on a text, one row
per engine configuration, against the fp32 reference.

Each row builds an engine with its options and scores the same text with `tensorjet.eval.perplexity`
(llama.cpp's method: non-overlapping windows of --context_len tokens, each scored on its second half),
so a row measures exactly what that engine computes. Rows whose options belong to a capability not
built yet (FeatureNotAvailableError) are reported as n/a with the message. Pre-quantized checkpoint
directories are rows too (`--checkpoint NAME=PATH`); they are compared with the reference row of
--model, so they should be quantized from the same weights.

    python benchmarks/quant_accuracy.py [DATA] [--max_chars 100000] [--context_len 512]
        [--rows fp32,bf16] [--checkpoint fp8-ckpt=/path/to/dir] [--device cpu] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import time
from pathlib import Path

import torch

from tensorjet import LLM
from tensorjet.config import FeatureNotAvailableError
from tensorjet.eval.perplexity import DEFAULT_CONTEXT_LEN, DEFAULT_SCORE_FROM, PerplexityResult, perplexity

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_MAX_CHARS = 100_000

# The rows: a name and the engine options that differ from the defaults. The first is the reference.
CONFIGS: dict[str, dict] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp32 + fp8 KV": {"dtype": "float32", "kv_cache_dtype": "fp8"},
    "fp8": {"dtype": "fp8"},
    "fp8 + fp8 KV": {"dtype": "fp8", "kv_cache_dtype": "fp8"},
}
REFERENCE = next(iter(CONFIGS))


def run_row(
    name: str, options: dict, text: str, args: argparse.Namespace
) -> tuple[dict, PerplexityResult | None]:
    """One configuration's numbers and result, or status "n/a" with the reason when it is not available."""
    row: dict = {"name": name, "options": options}
    print(f"--- {name}: {options}", flush=True)
    start = time.perf_counter()
    try:
        llm = LLM(**{"model": args.model, "device": args.device, **options})
    except FeatureNotAvailableError as error:
        print(f"n/a: {error}", flush=True)
        return {**row, "status": "n/a", "message": str(error)}, None
    try:
        load_seconds = time.perf_counter() - start
        result = perplexity(llm, text, context_len=args.context_len, score_from=args.score_from)
        print(result.summary(), flush=True)
        numbers = {
            "model": llm.engine.source.name,
            "weight_bytes": llm.stats()["weight_bytes"],
            "load_seconds": load_seconds,
        }
        return {**row, "status": "ok", **numbers, **result.to_dict()}, result
    finally:
        llm.shutdown()
        del llm
        gc.collect()  # the next row's engine takes its own KV budget


def paired_delta(result: PerplexityResult, reference: PerplexityResult) -> tuple[float, float] | None:
    """PPL / reference PPL - 1, in %, and its standard error, from the per-token differences of NLL
    (llama.cpp's ln(PPL(Q)/PPL(base))): both score the same tokens, so the spread of the text's own
    difficulty cancels and a small change is told from noise. None when the tokens differ."""
    if len(result.token_nlls) != len(reference.token_nlls):
        return None
    diffs = [q - r for q, r in zip(result.token_nlls, reference.token_nlls)]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    stderr = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / n / (n - 1)) if n > 1 else 0.0
    ratio = math.exp(mean)  # exactly the ratio of the two perplexities
    return 100 * (ratio - 1), 100 * ratio * stderr


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'config':<24} {'ppl':>10} {'+/-':>8} {'delta % vs ' + REFERENCE:>20} {'scored':>8} "
        f"{'weight MB':>10} {'s':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['name']:<24} {'n/a':>10}  {row['message']}")
            continue
        delta = "-"
        if row.get("delta_percent") is not None:
            delta = f"{row['delta_percent']:+.3f} +/- {row['delta_stderr_percent']:.3f}"
        lines.append(
            f"{row['name']:<24} {row['perplexity']:>10.4f} {row['perplexity_stderr']:>8.4f} {delta:>20} "
            f"{row['num_scored_tokens']:>8} {row['weight_bytes'] / 2**20:>10.1f} {row['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def _checkpoint(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="the text file")
    parser.add_argument(
        "--max_chars", type=int, default=DEFAULT_MAX_CHARS, help="score the first N characters (0: all)"
    )
    parser.add_argument("--context_len", type=int, default=DEFAULT_CONTEXT_LEN)
    parser.add_argument("--score_from", type=float, default=DEFAULT_SCORE_FROM)
    parser.add_argument(
        "--rows",
        default=",".join(CONFIGS),
        help=f"comma-separated configurations to run, of {list(CONFIGS)} (default: all)",
    )
    parser.add_argument(
        "--checkpoint",
        type=_checkpoint,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an extra row: a pre-quantized checkpoint directory, with the engine's default options",
    )
    parser.add_argument(
        "--model", default=None, help="the model of the configuration rows (default: bundled)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / f"quant_accuracy-{datetime.date.today().isoformat()}.json",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.rows.split(",") if name not in CONFIGS]
    if unknown:
        parser.error(f"--rows: unknown configurations {unknown}; known: {list(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    text = args.data.read_text(encoding="utf-8")
    if args.max_chars:
        text = text[: args.max_chars]
    plan = [(name, CONFIGS[name]) for name in args.rows.split(",")]
    plan += [(name, {"model": path}) for name, path in args.checkpoint]
    runs = [run_row(name, options, text, args) for name, options in plan]
    reference = next((result for (row, result) in runs if row["name"] == REFERENCE), None)
    for row, result in runs:
        if reference is not None and result is not None and result is not reference:
            delta = paired_delta(result, reference)
            row["delta_percent"], row["delta_stderr_percent"] = delta if delta is not None else (None, None)
    rows = [row for row, _ in runs]
    print()
    print(format_table(rows))
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "data": str(args.data),
        "max_chars": args.max_chars,
        "context_len": args.context_len,
        "score_from": args.score_from,
        "model": args.model or "bundled",
        "device": args.device,
        "reference": REFERENCE if reference is not None else None,
        "host": {"machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
