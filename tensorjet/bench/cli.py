"""`tensorjet bench` and `tensorjet tune`. `register(subparsers)` adds both to tensorjet's parser;
`main(argv)` runs them standalone."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tensorjet.bench import report
from tensorjet.bench.datasets import DEFAULT_NUM_REQUESTS
from tensorjet.engine_args import add_engine_args, engine_options

DEFAULT_VOCAB_SIZE = 32000  # serving mode's random ids stay below this: inside every Llama-family vocabulary


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` and `tune` subcommands; each sets `func(args) -> exit code`."""
    bench = subparsers.add_parser(
        "bench",
        help="measure throughput and latency, offline (in-process) or against a server (--url)",
        description="Benchmark the engine in-process, or any OpenAI-compatible server with --url.",
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=_guarded(bench_command))
    tune = subparsers.add_parser(
        "tune",
        help="find max_batch_size and chunked context for a workload; write a --config YAML",
        description="Raise max_batch_size until OOM or a latency target is missed, back off 20%%, "
        "try chunked context on and off, and write the best options as a YAML for `serve --config`.",
    )
    add_tune_arguments(tune)
    tune.set_defaults(func=_guarded(tune_command))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorjet")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---- arguments -------------------------------------------------------------------------------------
def _flag(parser: argparse._ActionsContainer, name: str, **kwargs) -> None:
    """A flag spelled as in the guide (`--input_len`) or with dashes (`--input-len`)."""
    dashed = [f"--{name.replace('_', '-')}"] if "_" in name else []
    parser.add_argument(f"--{name}", *dashed, **kwargs)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    _flag(
        group, "model", default=None, help="offline: the engine's model (default: bundled); --url: model name"
    )
    _flag(
        group,
        "dataset",
        default="random",
        help="'random' (token ids), 'shared_prefix' (random after a common --prefix_len prefix), or a "
        'JSONL file of {"prompt" | "input_ids", "output_tokens"} lines',
    )
    _flag(group, "num_requests", type=int, default=None, help="default: --batch_size, else 64 (JSONL: all)")
    _flag(group, "input_len", type=int, default=128, help="prompt tokens (synthetic datasets)")
    _flag(group, "output_len", type=int, default=128, help="output tokens (exact: EOS is ignored)")
    _flag(group, "range_ratio", type=float, default=0.0, help="lengths drawn uniformly in len*(1 +- ratio)")
    _flag(group, "prefix_len", type=int, default=0, help="shared_prefix: tokens every prompt starts with")
    _flag(group, "warmup", type=int, default=2, help="requests run before measuring (not reported)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_workload_arguments(parser)
    load = parser.add_argument_group("load")
    _flag(
        load,
        "url",
        default=None,
        help="serving mode: an OpenAI-compatible server, e.g. http://127.0.0.1:8000",
    )
    load.add_argument(
        "--batch_size",
        "--batch-size",
        "--max_concurrency",
        "--max-concurrency",
        dest="max_concurrency",
        metavar="N",
        type=int,
        default=None,
        help="at most this many requests in flight, a new one sent as one finishes (default: no limit)",
    )
    _flag(
        load,
        "request_rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals, req/s (default: all at once)",
    )
    _flag(
        load,
        "vocab_size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="--url: random ids are drawn below this",
    )
    output = parser.add_argument_group("output")
    _flag(output, "report_json", type=Path, default=None, help="write the numbers as JSON here")
    _flag(output, "plot", type=Path, default=None, help="write PNG plots into this directory")
    _flag(
        output,
        "sweep",
        default=None,
        help="NAME=V1,V2,...: run once per value of an option, e.g. max_batch_size=8,16,32",
    )
    add_engine_args(parser)
    return parser


def add_tune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_workload_arguments(parser)
    group = parser.add_argument_group("tuning")
    _flag(group, "target_p99_ttft_ms", type=float, default=None)
    _flag(group, "target_p99_tpot_ms", type=float, default=None)
    _flag(group, "target_p99_e2e_ms", type=float, default=None)
    _flag(group, "start_batch_size", type=int, default=8, help="first max_batch_size tried (then doubled)")
    _flag(group, "batch_size_limit", type=int, default=1024, help="largest max_batch_size tried")
    _flag(group, "output", type=Path, default=Path("tensorjet_tuned.yaml"), help="the YAML to write")
    _flag(group, "report_json", type=Path, default=None, help="write every trial's numbers as JSON here")
    add_engine_args(parser)
    # Every trial sends its whole workload at once, in-process.
    parser.set_defaults(url=None, max_concurrency=None, request_rate=float("inf"))
    return parser


# ---- commands --------------------------------------------------------------------------------------
def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad options and capabilities not built yet (FeatureNotAvailableError) end with their message
    and exit code 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return run


def bench_command(args: argparse.Namespace) -> int:
    if args.sweep:
        return _sweep_command(args)
    from tensorjet.bench.run import compare_without_speculation, run_benchmark

    result = run_benchmark(args)
    if args.speculative_model is not None and not args.url:
        compare_without_speculation(args, result.report)
    print(report.format_table(result.report))
    _warn_failures(result.records)
    if args.report_json:
        report.write_json(result.report, args.report_json)
    if args.plot:
        for path in report.plot_run(result.records, result.start, args.plot):
            print(f"wrote {path}")
    return _exit_code(result.report)


def _warn_failures(records: list) -> None:
    errors = [r.error for r in records if r.error]
    if errors:
        print(f"warning: {len(errors)} requests failed; the first: {errors[0]}", file=sys.stderr)


def _exit_code(numbers: dict) -> int:
    """1 when no request completed (an unreachable or failing server), else 0."""
    if numbers["num_completed"] == 0:
        print(f"error: all {numbers['num_requests']} requests failed", file=sys.stderr)
        return 1
    return 0


def _sweep_command(args: argparse.Namespace) -> int:
    from tensorjet.bench.sweep import run_sweep

    name, points = run_sweep(args, add_bench_arguments(argparse.ArgumentParser(prog="tensorjet bench")))
    print(report.format_sweep_table(name, points))
    path = report.plot_sweep(name, points, args.plot or Path("."))
    print(f"wrote {path}")
    if args.report_json:
        report.write_json(
            {"sweep": name, "points": [{k: v for k, v in p.items() if k != "result"} for p in points]},
            args.report_json,
        )
    return 0


def tune_command(args: argparse.Namespace) -> int:
    from tensorjet.bench.run import run_benchmark
    from tensorjet.bench.tune import Targets, format_trials, tune, write_config

    def run_point(options: dict) -> dict:
        point = copy.copy(args)
        vars(point).update(options)
        point.num_requests = max(args.num_requests or DEFAULT_NUM_REQUESTS, options["max_batch_size"])
        return run_benchmark(point).report

    targets = Targets(args.target_p99_ttft_ms, args.target_p99_tpot_ms, args.target_p99_e2e_ms)
    base = {k: v for k, v in engine_options(args).items() if v is not None}
    recommended, trials = tune(run_point, base, targets, args.start_batch_size, args.batch_size_limit)
    print(format_trials(trials))
    note = (
        f"written by tensorjet tune for input_len={args.input_len} output_len={args.output_len} "
        f"dataset={args.dataset}\nuse with: tensorjet serve --config {args.output}"
    )
    write_config(recommended, args.output, note)
    print(f"recommended: {json.dumps(recommended)}\nwrote {args.output}")
    if args.report_json:
        trial_rows = [{"options": t.options, "outcome": t.outcome, "report": t.report} for t in trials]
        report.write_json({"recommended": recommended, "trials": trial_rows}, args.report_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
