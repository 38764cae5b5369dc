"""The server's own options (the engine's are `EngineConfig`'s): the served name, what one request and
the whole server may hold, who may call it and under which host names."""

from __future__ import annotations

from dataclasses import dataclass

# The formats serve.tools parses (kept here too: options import nothing from the server).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_N = 16
DEFAULT_MAX_SEQUENCES = 1024
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 2**20
API_KEY_ENV = "TENSORJET_API_KEY"


@dataclass(frozen=True)
class ServerOptions:
    served_model_name: str = DEFAULT_SERVED_MODEL_NAME
    # Engine requests waiting for their first token before new ones get 429 (None: no limit).
    max_queue_size: int | None = None
    # Completions per prompt (`n`): each is a sequence with its own KV cache.
    max_n: int = DEFAULT_MAX_N
    # Sequences (prompts x n) held at once, queued or running: more get 429, a request larger than this 400.
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    # Checked against Content-Length before the body is read, and again while it is read.
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    # When set, every route but /health, /metrics, /version and the docs needs `Authorization: Bearer KEY`.
    api_key: str | None = None
    # Host header values answered (a name, or `*.suffix`); empty: any. Guards against DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    disable_docs: bool = False
    # How tool calls are read from free output (tool_choice "auto"): one of serve.tools.TOOL_CALL_PARSERS;
    # None: the format the chat template teaches (Hermes' tags when it names none).
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_n", "max_sequences", "max_request_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_size is not None and self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got {self.tool_call_parser!r}"
            )
