"""Accuracy gate for reduced-precision weights and KV cache: the engine's perplexity on a text, one row
per engine configuration, against the fp32 reference.

Each row builds an engine with its options and scores the same text with `tensorjet.eval.perplexity`
(llama.cpp's method: non-overlapping windows of --context_len tokens, each scored on its second half),
so a row measures exactly what that engine computes. Rows whose options belong to a capability not
built yet (FeatureNotAvailableError) are reported as n/a with the message. Pre-quantized checkpoint
directories are rows too (`--checkpoint NAME=PATH`); they are compared with the reference row of
--model, so they should be quantized from the same weights.

INT4 rows (`--int4_groups 128,64`): for each group size, tensorjet's own calibration of --model
(`tensorjet quantize`: round-to-nearest in GPTQ's symmetric and AWQ's asymmetric format, GPTQ, AWQ) and,
with --llmcompressor_python (a virtualenv with llmcompressor, benchmarks/llmcompressor_int4.py),
llmcompressor's GPTQ and AWQ, all calibrated on the same token ids: --calibration_samples windows of
--calibration_seq_len tokens of the calibration text (default: the one shipped with tensorjet, the last
280 KB of Tiny Shakespeare, so the default DATA's first --max_chars characters are held out). Each row
also reports its checkpoint's size on disk and the calibration time. The summary then checks, per
group size: each of our methods has a lower perplexity than round-to-nearest in its own format, and at
most 1.02x llmcompressor's same method.

    python benchmarks/quant_accuracy.py [DATA] [--max_chars 100000] [--context_len 512]
        [--rows fp32,bf16] [--checkpoint fp8-ckpt=/path/to/dir] [--device cpu] [--out FILE.json]
        [--int4_groups 128,64 --calibration_samples 128 --calibration_seq_len 512
         --llmcompressor_python /tmp/lcvenv/bin/python --work_dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tensorjet import LLM
from tensorjet.calibration.checkpoint import symmetric
from tensorjet.calibration.data import calibration_samples
from tensorjet.calibration.pipeline import CalibrationOptions
from tensorjet.calibration.quantize import CalibrationJob, quantize_to_checkpoint
from tensorjet.calibration.quantizer import QuantScheme
from tensorjet.config import FeatureNotAvailableError
from tensorjet.eval.perplexity import DEFAULT_CONTEXT_LEN, DEFAULT_SCORE_FROM, PerplexityResult, perplexity
from tensorjet.models.llama import head_dim_of
from tensorjet.models.loader import ModelSource, load_tokenizer, resolve_model

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
LLMCOMPRESSOR_SCRIPT = ROOT / "benchmarks" / "llmcompressor_int4.py"


@dataclass(frozen=True)
class Int4Row:
    """One INT4 checkpoint to make and score: who calibrates it, with which method, in which format."""

    tool: str  # "tensorjet" or "llmcompressor"
    method: str  # "rtn", "gptq" or "awq"
    checkpoint_format: str  # "gptq" (symmetric), "awq" (zero points); llmcompressor: compressed-tensors
    group_size: int

    @property
    def name(self) -> str:
        if self.tool == "llmcompressor":
            return f"llmcompressor {self.method} g{self.group_size}"
        suffix = (
            f" ({'sym' if symmetric(self.checkpoint_format) else 'asym'})" if self.method == "rtn" else ""
        )
        return f"{self.method} g{self.group_size}{suffix}"


def int4_plan(group_sizes: list[int]) -> list[Int4Row]:
    rows = []
    for g in group_sizes:
        rows += [
            Int4Row("tensorjet", "rtn", "gptq", g),
            Int4Row("tensorjet", "rtn", "awq", g),
            Int4Row("tensorjet", "gptq", "gptq", g),
            Int4Row("llmcompressor", "gptq", "gptq", g),
            Int4Row("tensorjet", "awq", "awq", g),
            Int4Row("llmcompressor", "awq", "awq", g),
        ]
    return rows


def input_widths(source: ModelSource) -> set[int]:
    """The input width of every decoder-layer projection."""
    config = source.hf_config
    return {config.hidden_size, config.num_attention_heads * head_dim_of(config), config.intermediate_size}


class Int4Maker:
    """Makes the INT4 rows' checkpoints, one at a time, all calibrated on the same token ids."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.source = resolve_model(args.model)
        self.token_ids = calibration_samples(
            load_tokenizer(self.source),
            args.calibration_samples,
            args.calibration_seq_len,
            args.calibration_data,
        )
        args.work_dir.mkdir(parents=True, exist_ok=True)

    def make(self, row: Int4Row) -> dict:
        """The row's checkpoint directory and calibration seconds, or the reason it has none."""
        if row.tool == "llmcompressor":
            return self._llmcompressor(row)
        out = self.args.work_dir / row.name.replace(" ", "-").replace("(", "").replace(")", "")
        print(f"--- calibrating {row.name} into {out}", flush=True)
        scheme = QuantScheme(4, row.group_size, symmetric=symmetric(row.checkpoint_format))
        if out.exists():
            shutil.rmtree(out)
        job = CalibrationJob(
            self.source,
            CalibrationOptions(row.method, scheme),
            row.checkpoint_format,
            self.token_ids,
            torch.device(self.args.device),
            torch.float32,
        )
        calibrated = quantize_to_checkpoint(job, out)
        seconds = calibrated.seconds
        del calibrated
        gc.collect()
        return {"path": str(out), "calibration_seconds": seconds}

    def _llmcompressor(self, row: Int4Row) -> dict:
        args, widths = self.args, input_widths(self.source)
        if args.llmcompressor_python is None:
            return {"message": "not run: pass --llmcompressor_python (a virtualenv with llmcompressor)"}
        if any(w % row.group_size for w in widths):
            return {
                "message": f"llmcompressor 0.14 needs the group size to divide every input width "
                f"({sorted(widths)}); it cannot make a narrower last group"
            }
        hf_dir = self.source.converted or self.source.path  # a GGUF's float weights as an HF directory
        ids_file = args.work_dir / "calibration_token_ids.json"
        ids_file.write_text(json.dumps(self.token_ids.tolist()))
        print(f"--- {row.name}", flush=True)
        command = [
            str(args.llmcompressor_python), str(LLMCOMPRESSOR_SCRIPT), "--source", str(hf_dir),
            "--token_ids", str(ids_file), "--output_dir", str(args.work_dir),
            "--group_size", str(row.group_size), "--methods", row.method,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr[-4000:], flush=True)
            error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no message"
            return {"message": f"llmcompressor failed: {error}"}
        entry = json.loads(result.stdout.strip().splitlines()[-1])[row.method]
        return {"path": entry["path"], "calibration_seconds": entry["seconds"]}


def disk_bytes(path: str | Path) -> int:
    """The weight files of a checkpoint directory (tokenizer and config left out)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


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
        f"{'config':<28} {'ppl':>10} {'+/-':>8} {'delta % vs ' + REFERENCE:>20} {'scored':>8} "
        f"{'weight MB':>10} {'disk MB':>8} {'calib s':>8} {'s':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['name']:<28} {'n/a':>10}  {row['message']}")
            continue
        delta = "-"
        if row.get("delta_percent") is not None:
            delta = f"{row['delta_percent']:+.3f} +/- {row['delta_stderr_percent']:.3f}"
        disk = f"{row['disk_bytes'] / 2**20:.1f}" if row.get("disk_bytes") else "-"
        calib = f"{row['calibration_seconds']:.1f}" if row.get("calibration_seconds") is not None else "-"
        lines.append(
            f"{row['name']:<28} {row['perplexity']:>10.4f} {row['perplexity_stderr']:>8.4f} {delta:>20} "
            f"{row['num_scored_tokens']:>8} {row['weight_bytes'] / 2**20:>10.1f} {disk:>8} {calib:>8} "
            f"{row['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def int4_verdicts(rows: list[dict], plan: list[Int4Row]) -> list[str]:
    """Per group size and method: ours against round-to-nearest in the same format, and against
    llmcompressor's same method."""
    ppl = {row["name"]: row["perplexity"] for row in rows if row["status"] == "ok"}
    lines = []
    for ours in (r for r in plan if r.tool == "tensorjet" and r.method != "rtn"):
        rtn = Int4Row("tensorjet", "rtn", ours.checkpoint_format, ours.group_size)
        peer = Int4Row("llmcompressor", ours.method, ours.checkpoint_format, ours.group_size)
        if ours.name not in ppl:
            continue
        parts = [f"{ours.name}: {ppl[ours.name]:.4f}"]
        if rtn.name in ppl:
            verdict = "lower" if ppl[ours.name] < ppl[rtn.name] else "NOT lower"
            parts.append(f"{verdict} than {rtn.name} {ppl[rtn.name]:.4f}")
        if peer.name in ppl:
            ratio = ppl[ours.name] / ppl[peer.name]
            parts.append(
                f"{ratio:.4f}x {peer.name} {ppl[peer.name]:.4f} ({'<=' if ratio <= 1.02 else '>'} 1.02x)"
            )
        lines.append("; ".join(parts))
    return lines


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
        "--int4_groups",
        default="",
        help="comma-separated group sizes of the INT4 rows (e.g. 128,64); default: no INT4 rows",
    )
    parser.add_argument("--calibration_samples", type=int, default=128, help="INT4 rows: calibration samples")
    parser.add_argument("--calibration_seq_len", type=int, default=512, help="INT4 rows: tokens per sample")
    parser.add_argument(
        "--calibration_data",
        type=Path,
        default=None,
        help="INT4 rows: default: the text shipped with tensorjet",
    )
    parser.add_argument(
        "--llmcompressor_python",
        type=Path,
        default=None,
        help="INT4 rows: python of a venv with llmcompressor",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "tensorjet-quant-accuracy",
        help="INT4 rows: where their checkpoints are written",
    )
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
    plan = [(name, CONFIGS[name], {}) for name in args.rows.split(",") if name]
    plan += [(name, {"model": path}, {"disk_bytes": disk_bytes(path)}) for name, path in args.checkpoint]
    int4 = int4_plan([int(g) for g in args.int4_groups.split(",") if g])
    maker = Int4Maker(args) if int4 else None
    runs = []
    for name, options, extra in plan:
        row, result = run_row(name, options, text, args)
        runs.append(({**row, **extra}, result))
    for row in int4:  # each made, then scored at once: a long run reports as it goes
        entry = maker.make(row)
        if "path" not in entry:
            runs.append(({"name": row.name, "status": "n/a", "message": entry["message"]}, None))
            continue
        result_row, result = run_row(row.name, {"model": entry["path"]}, text, args)
        extra = {"disk_bytes": disk_bytes(entry["path"]), "calibration_seconds": entry["calibration_seconds"]}
        runs.append(({**result_row, **extra, "tool": row.tool, "group_size": row.group_size}, result))
        print(f"{row.name}: calibration {entry['calibration_seconds']:.1f} s", flush=True)
        write_report(runs, int4, args)
    write_report(runs, int4, args, final=True)


def write_report(runs: list, int4: list[Int4Row], args: argparse.Namespace, final: bool = False) -> None:
    """Deltas against the reference, the table (printed when `final`) and the JSON report."""
    reference = next((result for (row, result) in runs if row["name"] == REFERENCE), None)
    for row, result in runs:
        if reference is not None and result is not None and result is not reference:
            delta = paired_delta(result, reference)
            row["delta_percent"], row["delta_stderr_percent"] = delta if delta is not None else (None, None)
    rows = [row for row, _ in runs]
    source = resolve_model(args.model)
    for row in rows:  # the float checkpoint's own weight files (a GGUF's: its converted HF directory)
        if row["name"] == REFERENCE and row["status"] == "ok" and source.kind != "dummy":
            row["disk_bytes"] = disk_bytes(source.converted or source.path)
    verdicts = int4_verdicts(rows, int4)
    if final:
        print()
        print(format_table(rows))
        if verdicts:
            print()
            print("\n".join(verdicts))
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "data": str(args.data),
        "max_chars": args.max_chars,
        "context_len": args.context_len,
        "score_from": args.score_from,
        "model": args.model or "bundled",
        "device": args.device,
        "reference": REFERENCE if reference is not None else None,
        "calibration": {
            "data": str(args.calibration_data or "tensorjet's shipped text"),
            "samples": args.calibration_samples,
            "seq_len": args.calibration_seq_len,
        }
        if int4
        else None,
        "host": {"machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
        "int4_verdicts": verdicts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if final:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
