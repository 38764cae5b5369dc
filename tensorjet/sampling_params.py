"""Per-request sampling options. Every field is validated on construction so a bad value
fails with a ValueError naming the field before anything is scheduled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# What a constraint's `spec` holds, per kind: a JSON schema (as JSON text), none (any JSON object), a
# regular expression, the choices (a tuple of strings), a grammar (GBNF/EBNF or Lark text).
StructuredOutputKind = Literal["json", "json_object", "regex", "choice", "grammar"]
STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, enforced token by token with a grammar: the sequence may only
    sample tokens that keep its text a prefix of a match, and ends once the match is complete."""

    kind: StructuredOutputKind
    spec: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise ValueError(
                f"structured_output.kind must be one of {STRUCTURED_OUTPUT_KINDS}, got {self.kind!r}"
            )
        if self.kind == "json_object":
            if self.spec is not None:
                raise ValueError("structured_output of kind 'json_object' takes no spec")
        elif self.kind == "choice":
            if (
                not isinstance(self.spec, tuple)
                or not self.spec
                or not all(isinstance(c, str) and c for c in self.spec)
            ):
                raise ValueError(
                    "structured_output of kind 'choice' needs a non-empty tuple of non-empty strings"
                )
        elif not isinstance(self.spec, str) or not self.spec:
            raise ValueError(f"structured_output of kind {self.kind!r} needs its spec as a non-empty string")


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # number of top logprobs returned per generated token
    prompt_logprobs: int | None = None  # top logprobs per prompt token (echo)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Added to the token's logit before sampling, in [-100, 100] (OpenAI's `logit_bias`).
    logit_bias: dict[int, float] | None = None
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            fail("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            fail("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if self.temperature < 0:
            fail("temperature", "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be an integer >= 1, or 0/-1 to disable")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            fail("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            fail("prompt_logprobs", "must be in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be non-negative integers")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0:
                fail("logit_bias", "must map non-negative token ids to biases")
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                fail("logit_bias", f"must hold biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            fail("structured_output", "must be a StructuredOutput")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_token_history(self) -> bool:
        """Whether sampling reads the tokens generated so far (penalties) on the host."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
