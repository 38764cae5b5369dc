"""`--sweep NAME=V1,V2,...`: the same workload once per value of an engine option (a fresh engine
each time) or of a workload flag such as max_concurrency (one engine shared by all points)."""

from __future__ import annotations

import argparse
import copy
import logging
from contextlib import nullcontext

from tensorjet.bench import offline
from tensorjet.bench.run import run_benchmark
from tensorjet.config import ENGINE_OPTIONS
from tensorjet.engine_args import engine_options

logger = logging.getLogger(__name__)


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    name, sep, values = spec.partition("=")
    texts = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not name.strip() or not texts:
        raise ValueError(f"--sweep expects NAME=V1,V2,... (e.g. max_batch_size=8,16,32), got {spec!r}")
    return name.strip(), texts


def typed_values(parser: argparse.ArgumentParser, name: str, texts: list[str]) -> tuple[str, list]:
    """(dest, values) exactly as `--NAME value` would set them on this parser's command line."""
    action = parser._option_string_actions.get(f"--{name}")  # argparse has no public lookup
    if action is None:
        raise ValueError(f"--sweep: {name!r} is not an option of `tensorjet bench`")
    return action.dest, [getattr(parser.parse_args([f"--{name}", text]), action.dest) for text in texts]


def run_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, list[dict]]:
    """Returns (swept option, points); a point is {value, report, result} or {value, error} after
    an out-of-memory, so that one too-large value does not lose the rest of the sweep."""
    name, texts = parse_sweep(args.sweep)
    dest, values = typed_values(parser, name, texts)
    per_point_engine = dest in ENGINE_OPTIONS
    if per_point_engine and args.url:
        raise ValueError(f"--sweep {name}: engine options belong to the server in --url mode")
    shared = nullcontext() if per_point_engine or args.url else offline.open_llm(engine_options(args))
    points = []
    with shared as llm:
        for value in values:
            point_args = copy.copy(args)
            setattr(point_args, dest, value)
            try:
                result = run_benchmark(point_args, llm)
            except Exception as error:
                if not offline.is_oom(error):
                    raise
                logger.warning("%s=%s ran out of memory: %s", name, value, error)
                points.append({"value": value, "error": "out of memory"})
                continue
            points.append({"value": value, "report": result.report, "result": result})
    return name, points
