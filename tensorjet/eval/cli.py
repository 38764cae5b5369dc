"""`tensorjet eval ppl`: the engine's perplexity on a text file. `register(subparsers)` adds `eval` to
tensorjet's parser."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tensorjet.config import ENGINE_OPTIONS
from tensorjet.engine_args import add_engine_args, engine_options, parse_bool
from tensorjet.eval.perplexity import DEFAULT_CONTEXT_LEN, DEFAULT_SCORE_FROM, first_scored_position


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` and its `ppl` subcommand; it sets `func(args) -> exit code`."""
    evaluate = subparsers.add_parser("eval", help="evaluate the engine's outputs (perplexity)")
    tasks = evaluate.add_subparsers(dest="eval_task", required=True)
    ppl = tasks.add_parser(
        "ppl",
        help="perplexity of a text file through the engine",
        description="Perplexity of a text file, computed from the engine's prompt log-probabilities over "
        "non-overlapping windows of --context_len tokens, each scored after its first --score_from share "
        "(as llama.cpp's llama-perplexity does).",
    )
    add_ppl_arguments(ppl)
    ppl.set_defaults(func=ppl_command)


def _flag(parser: argparse._ActionsContainer, name: str, **kwargs) -> None:
    """A flag spelled with underscores (`--context_len`) or dashes (`--context-len`)."""
    dashed = [f"--{name.replace('_', '-')}"] if "_" in name else []
    parser.add_argument(f"--{name}", *dashed, **kwargs)


def add_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "data", type=Path, required=True, help="the text file (UTF-8)")
    _flag(parser, "model", default=None, help=ENGINE_OPTIONS["model"].help)
    _flag(
        parser,
        "context_len",
        type=int,
        default=DEFAULT_CONTEXT_LEN,
        help=f"tokens per window (default {DEFAULT_CONTEXT_LEN})",
    )
    _flag(
        parser,
        "score_from",
        type=float,
        default=DEFAULT_SCORE_FROM,
        help="score each window's tokens after this share of it, so each has that much context "
        f"(default {DEFAULT_SCORE_FROM}, llama.cpp's)",
    )
    _flag(
        parser,
        "max_chars",
        type=_positive_int,
        default=None,
        help="read only the first N characters of the text",
    )
    _flag(
        parser,
        "add_bos",
        type=parse_bool,
        default=None,
        help="put BOS at the start of each window (default: when the model's tokenizer adds one to a text)",
    )
    _flag(parser, "json", type=Path, default=None, help="write the result as JSON here")
    add_engine_args(parser)


def ppl_command(args: argparse.Namespace) -> int:
    """Bad input ends with a message naming the flag and exit code 2, as `tensorjet generate` does."""
    try:
        first_scored_position(args.context_len, args.score_from)  # before loading a model
        text = _read_text(args.data)
        from tensorjet.eval.perplexity import perplexity
        from tensorjet.llm import LLM

        llm = LLM(**engine_options(args))
        try:
            result = perplexity(
                llm,
                text,
                context_len=args.context_len,
                score_from=args.score_from,
                max_chars=args.max_chars,
                add_bos=args.add_bos,
            )
        finally:
            llm.shutdown()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--data {path}: cannot read it ({error})") from error
    if not text.strip():
        raise ValueError(f"--data {path} is empty: nothing to score")
    return text
