"""The OpenAI wire format: request bodies (validated by pydantic, so a bad field is a 400 naming it),
response bodies and stream chunks, and the error body."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    model_validator,
)

from tensorjet.sampling_params import SamplingParams


class APIError(Exception):
    """An error the client caused or should know about, sent as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def bad_request(cls, error: ValueError, param: str | None = None) -> APIError:
        """A ValueError from SamplingParams or the engine, with the field it names as `param`."""
        message = str(error).replace("SamplingParams.", "")
        named = re.match(r"(\w+) ", message)
        if param is None and named and named.group(1) in SAMPLING_FIELDS:
            param = "logprobs" if named.group(1) == "prompt_logprobs" else named.group(1)
        return cls(400, message, param=param)

    def body(self) -> dict:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()


SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__) | {"prompt"}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- requests ------------------------------------------------------------------------------------
# Every stop string is checked against the text's tail after every token, on the engine thread: their
# number and length bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # torch.Generator seeds: signed 64-bit
# A temperature this small is greedy in all but name, and dividing the logits by it overflows float32
# (1e-300 is 0 there): as vLLM does, a smaller positive one is raised to it.
MIN_TEMPERATURE = 1e-2
# Top-p below the top token's probability (>= 1 / vocab size) keeps that token alone; a top-p of 1e-300 is
# 0 in float32 and would keep none, so a smaller one is raised to 1e-6 (vocabularies hold under a million).
MIN_TOP_P = 1e-6


def _utf8_encodable(text: str) -> str:
    """JSON may escape a lone surrogate (\\ud800), which is no Unicode text: refuse it here, naming the
    field, rather than fail in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"contains a lone surrogate at index {error.start}, which is not valid Unicode"
        ) from None
    return text


def _integral(value: Any) -> Any:
    """JSON has one number type, and JSON Schema counts 4.0 as the integer 4; "4" and true are none."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds: int) -> Any:
    """An integer field's type (with its bounds: given after the conversion, they stay in the schema)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Text = Annotated[str, AfterValidator(_utf8_encodable)]
NonEmptyText = Annotated[Text, Field(min_length=1)]
StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)]
Role = Literal["system", "developer", "user", "assistant", "tool"]


def token_id_type(vocab_size: int | None = None) -> Any:
    return integer(ge=0, lt=vocab_size)


def prompt_type(vocab_size: int | None = None) -> Any:
    """Text, texts, token ids, or lists of token ids; none of them empty."""
    ids = Annotated[list[token_id_type(vocab_size)], Field(min_length=1)]
    texts = Annotated[list[NonEmptyText], Field(min_length=1)]
    return NonEmptyText | texts | ids | Annotated[list[ids], Field(min_length=1)]


# Unbounded by any vocabulary: `request_models` bounds them for a server.
TokenId = token_id_type()
Prompt = prompt_type()


class OpenAIRequest(BaseModel):
    # Clients send fields tensorjet does not use (user, logit_bias, ...); they are ignored, like vLLM does.
    # No coercion: "4" is no integer and "yes" no boolean, as in OpenAI's own API; and no NaN or infinity.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False


class SamplingRequest(OpenAIRequest):
    """The fields completions and chat share. None means "the OpenAI default" (clients send null).
    `n`, `max_tokens` and `min_tokens` get this server's bounds in `request_models`."""

    model: Text | None = None
    n: integer(ge=1) | None = 1
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: integer(ge=-1) | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    stop: Stop | None = None
    seed: integer(ge=SEED_MIN, le=SEED_MAX) | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Divides positive logits and multiplies negative ones: kept where float32 stays finite and nonzero.
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    ignore_eos: bool = False
    min_tokens: integer(ge=0) = 0
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def num_choices(self) -> int:
        return _default(self.n, 1)

    @property
    def streams(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """Raises ValueError naming the field for out-of-range values (SamplingParams checks them)."""
        n = self.num_choices
        if self.seed is not None and self.seed + n - 1 > SEED_MAX:
            # Completion i is seeded with seed + i.
            raise ValueError(
                f"seed + n - 1 must be at most {SEED_MAX} (completion i is seeded with seed + i)"
            )
        temperature = _default(self.temperature, 1.0)
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=max(temperature, MIN_TEMPERATURE) if temperature > 0 else 0.0,
            top_p=max(_default(self.top_p, 1.0), MIN_TOP_P),
            top_k=_default(self.top_k, 0),
            min_p=_default(self.min_p, 0.0),
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            presence_penalty=_default(self.presence_penalty, 0.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


def _default(value, default):
    return default if value is None else value


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    # 0 only with echo: score the prompt and generate nothing (lm-eval's loglikelihood).
    max_tokens: integer(ge=0) | None = 16
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool | None = False


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: Text


class ChatMessage(OpenAIRequest):
    role: Role
    content: Text | list[TextPart]
    name: Text | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: integer(ge=1) | None = None
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool | None = False
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    add_generation_prompt: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        return _default(self.max_completion_tokens, self.max_tokens)


class TokenizeRequest(OpenAIRequest):
    """Exactly one of `prompt` and `messages` (neither may be null)."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}
    )

    model: Text | None = None
    prompt: Text = None  # type: ignore[assignment]  # absent, never null
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = None  # type: ignore[assignment]
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = {"prompt", "messages"} & self.model_fields_set
        if len(given) != 1:
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(OpenAIRequest):
    model: Text | None = None
    tokens: list[TokenId]


@dataclass(frozen=True)
class RequestLimits:
    """What this server's engine and options allow, written into its request models."""

    max_n: int
    max_seq_len: int
    vocab_size: int  # of the model: prompt token ids
    tokenizer_size: int  # of the tokenizer: ids /detokenize can decode


@dataclass(frozen=True)
class RequestModels:
    completion: type[CompletionRequest]
    chat: type[ChatCompletionRequest]
    tokenize: type[TokenizeRequest]
    detokenize: type[DetokenizeRequest]


def request_models(limits: RequestLimits) -> RequestModels:
    """The request models with this server's bounds in their fields, so that validation and the OpenAPI
    schema agree on them: `n`, `max_tokens` and `min_tokens` (a prompt takes at least one position of the
    context), and the token ids."""
    longest = limits.max_seq_len - 1
    shared = {
        "n": (integer(ge=1, le=limits.max_n) | None, 1),
        "min_tokens": (integer(ge=0, le=longest), 0),
    }

    def bounded(base: type[BaseModel], **fields) -> Any:
        return create_model(base.__name__, __base__=base, __module__=__name__, **fields)

    return RequestModels(
        completion=bounded(
            CompletionRequest,
            **shared,
            prompt=(prompt_type(limits.vocab_size), ...),
            max_tokens=(integer(ge=0, le=longest) | None, 16),
        ),
        chat=bounded(
            ChatCompletionRequest,
            **shared,
            max_tokens=(integer(ge=1, le=longest) | None, None),
            max_completion_tokens=(integer(ge=1, le=longest) | None, None),
        ),
        tokenize=TokenizeRequest,
        detokenize=bounded(DetokenizeRequest, tokens=(list[token_id_type(limits.tokenizer_size)], ...)),
    )


# ---- responses -----------------------------------------------------------------------------------
def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token (the first prompt token's None)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with object "text_completion" too, as OpenAI does) one stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tensorjet"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"]


class VersionResponse(BaseModel):
    version: str
