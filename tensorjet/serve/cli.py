"""`tensorjet serve [MODEL]`: the OpenAI-compatible server from the command line.

Engine options are the same flags as `tensorjet generate` (guide spellings or dashes); `--config FILE.yaml`
gives any option from a file, and flags on the command line override it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tensorjet.config import ENGINE_OPTIONS
from tensorjet.engine_args import add_engine_args, engine_options

DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

logger = logging.getLogger("tensorjet.serve")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to the main `tensorjet` parser."""
    parser = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_serve_args(parser)
    parser.set_defaults(func=run_serve)
    return parser


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so a --config file can fill what the command line left unset.
    parser.add_argument("model", nargs="?", default=None, help=ENGINE_OPTIONS["model"].help)
    parser.add_argument("--host", default=None, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None, help=f"port to bind (default {DEFAULT_PORT})")
    parser.add_argument(
        "--served_model_name",
        "--served-model-name",
        default=None,
        help=f"the model name clients send (default: MODEL as given, or {DEFAULT_SERVED_MODEL_NAME})",
    )
    parser.add_argument(
        "--max_queue_size",
        "--max-queue-size",
        type=_non_negative_int,
        default=None,
        help="most requests waiting for their first token; more get HTTP 429 (default: unlimited)",
    )
    parser.add_argument("--config", default=None, help="YAML file of options (flag names as keys)")
    add_engine_args(parser)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def load_config(path: str) -> argparse.Namespace:
    """The file's options, parsed exactly as if they were flags (same types, same error messages)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of option names to values")
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        if key == "model":
            argv.insert(0, str(value))
        else:
            argv += [f"--{key}", str(value)]
    parser = argparse.ArgumentParser(prog=f"tensorjet serve --config {path}")
    add_serve_args(parser)
    return parser.parse_args(argv)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the command line left unset from --config, then the defaults."""
    if args.config:
        for name, value in vars(load_config(args.config)).items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
    args.host = args.host or DEFAULT_HOST
    args.port = DEFAULT_PORT if args.port is None else args.port
    args.served_model_name = args.served_model_name or args.model or DEFAULT_SERVED_MODEL_NAME
    return args


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tensorjet.llm import LLM
    from tensorjet.serve.app import build_app

    args = resolve_args(args)
    _configure_logging(getattr(args, "log_level", "INFO"))
    try:
        llm = LLM(**engine_options(args))
        app = build_app(llm, args.served_model_name, args.max_queue_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The engine stops with the app: uvicorn re-raises a SIGTERM once the app is down, which would end the
    # process before `finally` (tensor-parallel workers then lose rank 0 instead of being stopped).
    app.router.lifespan_context = _stops_engine(llm)
    log_banner(llm, args)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            access_log=False,
            log_level="info",
            timeout_graceful_shutdown=5,
        )
    finally:
        llm.shutdown()
    return 0


def _stops_engine(llm):
    @contextlib.asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        yield
        llm.shutdown()

    return lifespan


def _configure_logging(level: str) -> None:
    """Request lines and the banner are INFO, shown even when the rest of tensorjet logs at WARNING."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(min(logging.INFO, logging.getLogger().getEffectiveLevel()))


def log_banner(llm, args: argparse.Namespace) -> None:
    stats = llm.stats()
    config = llm.config
    logger.info(
        "tensorjet serve: model=%s served as %s dtype=%s device=%s kv_cache=%d blocks x %d = %d tokens "
        "max_seq_len=%d max_batch_size=%d max_num_tokens=%d scheduler_policy=%s max_queue_size=%s "
        "on http://%s:%d",
        llm.engine.source.name,
        args.served_model_name,
        str(config.torch_dtype).removeprefix("torch."),
        config.torch_device,
        stats["kv_blocks_total"],
        stats["kv_block_size"],
        stats["kv_blocks_total"] * stats["kv_block_size"],
        llm.engine.max_seq_len,
        config.scheduler.max_batch_size,
        config.scheduler.max_num_tokens,
        config.scheduler.scheduler_policy,
        "unlimited" if args.max_queue_size is None else args.max_queue_size,
        args.host,
        args.port,
    )


def build_parser() -> argparse.ArgumentParser:
    """A `tensorjet` parser holding only `serve`, for running this module before it is wired in."""
    parser = argparse.ArgumentParser(prog="tensorjet")
    parser.add_argument("--log-level", default="INFO")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m tensorjet.serve.cli serve [MODEL] [options]`."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
