"""`tensorjet serve [MODEL]`: the OpenAI-compatible server from the command line.

Engine options are the same flags as `tensorjet generate` (guide spellings or dashes); `--config FILE.yaml`
gives any option from a file, and flags on the command line override it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tensorjet.config import ENGINE_OPTIONS
from tensorjet.engine_args import add_engine_args, engine_options, parse_bool
from tensorjet.serve.options import (
    API_KEY_ENV,
    DEFAULT_MAX_N,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_MAX_SEQUENCES,
    DEFAULT_SERVED_MODEL_NAME,
    TOOL_CALL_PARSERS,
    ServerOptions,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0

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
    parser.add_argument(
        "--max_n",
        "--max-n",
        type=_positive_int,
        default=None,
        help=f"most completions per prompt a request may ask for (`n`) (default {DEFAULT_MAX_N})",
    )
    parser.add_argument(
        "--max_sequences",
        "--max-sequences",
        type=_positive_int,
        default=None,
        help="most sequences (prompts x n) in progress at once; a request that would go past it gets HTTP "
        f"429, one larger than it 400 (default {DEFAULT_MAX_SEQUENCES})",
    )
    parser.add_argument(
        "--max_request_body_bytes",
        "--max-request-body-bytes",
        type=_positive_int,
        default=None,
        help="largest request body in bytes; larger ones get HTTP 413 unread "
        f"(default {DEFAULT_MAX_REQUEST_BODY_BYTES})",
    )
    parser.add_argument(
        "--api_key",
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every route but /health, /metrics, /version and the "
        f"docs (default: ${API_KEY_ENV}, else none)",
    )
    parser.add_argument(
        "--allowed_hosts",
        "--allowed-hosts",
        default=None,
        help="comma-separated Host header values to answer (`example.com`, `*.example.com`); others get HTTP "
        "400, which stops DNS rebinding (default: any)",
    )
    parser.add_argument(
        "--disable_docs",
        "--disable-docs",
        type=parse_bool,
        nargs="?",
        const=True,
        default=None,
        help="serve no /docs, /redoc or /openapi.json (default: false)",
    )
    parser.add_argument(
        "--tool_call_parser",
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="how tool calls are read from a model's output with tool_choice auto: `hermes` (<tool_call> "
        "tags, Qwen2.5), `llama3_json` (Llama 3.1/3.2), `mistral` ([TOOL_CALLS]) (default: the format the "
        "chat template names, else hermes)",
    )
    parser.add_argument(
        "--shutdown_timeout",
        "--shutdown-timeout",
        type=_non_negative_float,
        default=None,
        help="on SIGTERM or Ctrl-C, seconds to let requests in progress finish before they are cancelled "
        f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S:g})",
    )
    parser.add_argument("--config", default=None, help="YAML file of options (flag names as keys)")
    add_engine_args(parser)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
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
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.shutdown_timeout is None:
        args.shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT_S
    return args


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The server's options from resolved arguments (unset ones keep ServerOptions' defaults)."""
    given = {
        "served_model_name": args.served_model_name,
        "max_queue_size": args.max_queue_size,
        "max_n": args.max_n,
        "max_sequences": args.max_sequences,
        "max_request_body_bytes": args.max_request_body_bytes,
        "api_key": args.api_key,
        "disable_docs": args.disable_docs,
        "tool_call_parser": args.tool_call_parser,
    }
    if args.allowed_hosts:
        given["allowed_hosts"] = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    return ServerOptions(**{name: value for name, value in given.items() if value is not None})


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tensorjet.llm import LLM
    from tensorjet.serve.allocators import configure_server_allocators
    from tensorjet.serve.app import build_app

    args = resolve_args(args)
    _configure_logging(getattr(args, "log_level", "INFO"))
    configure_server_allocators()
    try:
        options = server_options(args)
        llm = LLM(**engine_options(args))
        app = build_app(llm, options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    llm.make_kv_cache_resident()  # the server's memory is all its own from the start
    # The engine stops with the app: uvicorn re-raises a SIGTERM once the app is down, which would end the
    # process before `finally` (tensor-parallel workers then lose rank 0 instead of being stopped).
    app.router.lifespan_context = _stops_engine(llm, app.router.lifespan_context)
    log_banner(llm, args, options)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            access_log=False,
            log_level="info",
            # After this, streams still open are cancelled, which aborts their engine requests.
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    finally:
        llm.shutdown()
    return 0


def _stops_engine(llm, lifespan: Callable[[Any], contextlib.AbstractAsyncContextManager]):
    """The app's `lifespan`, then the engine's shutdown."""

    @contextlib.asynccontextmanager
    async def stopping(app) -> AsyncIterator[None]:
        async with lifespan(app):
            yield
        llm.shutdown()

    return stopping


def _configure_logging(level: str) -> None:
    """Request lines and the banner are INFO, shown even when the rest of tensorjet logs at WARNING."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(min(logging.INFO, logging.getLogger().getEffectiveLevel()))


def log_banner(llm, args: argparse.Namespace, options: ServerOptions) -> None:
    stats = llm.stats()
    config = llm.config
    logger.info(
        "tensorjet serve: model=%s served as %s dtype=%s device=%s kv_cache=%d blocks x %d = %d tokens "
        "max_seq_len=%d max_batch_size=%d max_num_tokens=%d scheduler_policy=%s max_queue_size=%s "
        "max_n=%d max_sequences=%d api_key=%s allowed_hosts=%s on http://%s:%d",
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
        "unlimited" if options.max_queue_size is None else options.max_queue_size,
        options.max_n,
        options.max_sequences,
        "required" if options.api_key is not None else "none",
        ",".join(options.allowed_hosts) or "any",
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
