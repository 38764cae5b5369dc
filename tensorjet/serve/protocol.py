"""The OpenAI wire format: request bodies (validated by pydantic, so a bad field is a 400 naming it),
response bodies and stream chunks, and the error body."""

from __future__ import annotations

import json
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

from tensorjet.sampling_params import MAX_LOGIT_BIAS, SamplingParams, StructuredOutput


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
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
# Every biased token is one more write to the logits each step (OpenAI takes up to 300).
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_CHOICES = 256  # guided_choice: its grammar has one alternative each
MAX_TOOLS = 128
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


def decimal_below_pattern(bound: int) -> str:
    """A regex matching the decimal numbers 0 .. bound - 1 without leading zeros (a logit_bias key is a
    token id as a JSON object key, so the schema bounds it by its digits)."""
    top = str(bound - 1)
    alternatives = ["0"] if bound > 0 else []
    for length in range(1, len(top)):  # shorter numbers: any digits
        alternatives.append("[1-9]" + ("[0-9]" * (length - 1)) if length > 1 else "[1-9]")
    for i, digit in enumerate(top):  # as long as the top: below it at position i, equal before
        lowest = 1 if i == 0 else 0
        if int(digit) > lowest:
            below = f"[{lowest}-{int(digit) - 1}]" if int(digit) - 1 > lowest else str(lowest)
            alternatives.append(top[:i] + below + "[0-9]" * (len(top) - i - 1))
    if top != "0":
        alternatives.append(top)
    return "^(" + "|".join(dict.fromkeys(alternatives)) + ")$"


def logit_bias_type(vocab_size: int | None = None) -> Any:
    key = Annotated[
        str, Field(pattern=decimal_below_pattern(vocab_size) if vocab_size else r"^(0|[1-9][0-9]*)$")
    ]
    bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
    # A key outside the pattern is an error, so the schema says so: with `patternProperties` alone,
    # JSON Schema would allow any other key with any value.
    only_token_ids = {"additionalProperties": False}
    return Annotated[
        dict[key, bias], Field(max_length=MAX_LOGIT_BIAS_ENTRIES, json_schema_extra=only_token_ids)
    ]


def stop_token_ids_type(vocab_size: int | None = None) -> Any:
    return Annotated[list[token_id_type(vocab_size)], Field(max_length=MAX_STOP_TOKEN_IDS)]


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
    # Every chunk carries the usage so far (vLLM's extension).
    continuous_usage_stats: bool | None = False


class TextFormat(OpenAIRequest):
    type: Literal["text"]


class JSONObjectFormat(OpenAIRequest):
    type: Literal["json_object"]


class JSONSchemaSpec(OpenAIRequest):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    # The output always follows the schema strictly (no properties it does not name), strict or not.
    strict: bool | None = None


class JSONSchemaFormat(OpenAIRequest):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


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
    # Token id (as a string) -> bias added to its logit; the ids are bounded by the vocabulary.
    logit_bias: logit_bias_type() | None = None
    stop_token_ids: stop_token_ids_type() | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output: at most one of these (vLLM's guided_* fields come in `extra_body`).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: NonEmptyText | None = None
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    guided_grammar: NonEmptyText | None = None

    @property
    def num_choices(self) -> int:
        return _default(self.n, 1)

    @property
    def streams(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.continuous_usage_stats)

    def check_dependent_fields(self) -> None:
        """Fields that mean something only with another one (400 naming the dependent one)."""
        if self.stream_options is not None and not self.streams:
            raise APIError(400, "stream_options needs stream=true", param="stream_options")

    def structured_output(self) -> tuple[StructuredOutput, str] | None:
        """The request's constraint and the field that gave it; 400 when more than one field asks."""
        given: list[tuple[StructuredOutput, str]] = []
        if self.response_format is not None and self.response_format.type != "text":
            if isinstance(self.response_format, JSONSchemaFormat):
                schema = json.dumps(self.response_format.json_schema.schema_)
                given.append((StructuredOutput("json", schema), "response_format"))
            else:
                given.append((StructuredOutput("json_object"), "response_format"))
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            given.append((StructuredOutput("json", schema), "guided_json"))
        if self.guided_regex is not None:
            given.append((StructuredOutput("regex", self.guided_regex), "guided_regex"))
        if self.guided_choice is not None:
            given.append((StructuredOutput("choice", tuple(self.guided_choice)), "guided_choice"))
        if self.guided_grammar is not None:
            given.append((StructuredOutput("grammar", self.guided_grammar), "guided_grammar"))
        if len(given) > 1:
            names = ", ".join(field for _, field in given)
            raise APIError(400, f"give at most one structured output field, got {names}", param=given[1][1])
        return given[0] if given else None

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        structured_output: StructuredOutput | None = None,
        n: int | None = None,
    ) -> SamplingParams:
        """Raises ValueError naming the field for out-of-range values (SamplingParams checks them). `n`:
        the sequences to generate, when not `n` (best_of)."""
        n = self.num_choices if n is None else n
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
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            structured_output=structured_output,
        )


def _default(value, default):
    return default if value is None else value


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    # 0 only with echo: score the prompt and generate nothing (lm-eval's loglikelihood).
    max_tokens: integer(ge=0) | None = 16
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool | None = False
    # best_of sequences are generated per prompt and the n likeliest (cumulative logprob) returned.
    best_of: integer(ge=1) | None = None
    # Fill in the middle: the text after the completion (needs the model's FIM tokens).
    suffix: Text | None = None

    def check_dependent_fields(self) -> None:
        super().check_dependent_fields()
        if self.best_of is not None:
            if self.best_of < self.num_choices:
                raise APIError(
                    400, f"best_of ({self.best_of}) must be >= n ({self.num_choices})", param="best_of"
                )
            if self.streams and self.best_of > self.num_choices:
                raise APIError(400, "best_of > n cannot be streamed", param="best_of")


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class ToolCallFunction(OpenAIRequest):
    name: FunctionName
    arguments: Text  # JSON text


class ToolCallMessage(OpenAIRequest):
    """A tool call of an earlier assistant message, sent back with the conversation."""

    id: NonEmptyText
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(OpenAIRequest):
    role: Role
    # Null only for an assistant message that made tool calls.
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCallMessage], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_call_id: NonEmptyText | None = None  # a tool message: which call it answers

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                "content is required (it may be null only in an assistant message with tool_calls)"
            )
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    @property
    def text(self) -> str:
        content = self.content
        if isinstance(content, list):
            return "".join(part.text for part in content)
        return content or ""

    def as_template_message(self) -> dict[str, Any]:
        """The message as chat templates read it: tool call arguments as objects (HF's convention)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _json_or_text(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(OpenAIRequest):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ChatTool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: FunctionName


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: integer(ge=1) | None = None
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool | None = False
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    add_generation_prompt: bool = True
    tools: Annotated[list[ChatTool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @property
    def requested_max_tokens(self) -> int | None:
        return _default(self.max_completion_tokens, self.max_tokens)

    @property
    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named" (a named function; without tools, "none")."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def check_dependent_fields(self) -> None:
        super().check_dependent_fields()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {tool.function.name for tool in self.tools or []}:
                raise APIError(
                    400,
                    f"tool_choice names the function {name!r}, which is not in tools",
                    param="tool_choice",
                )
        if self.tool_mode in ("required", "named") and self.structured_output() is not None:
            raise APIError(
                400,
                "tool_choice required or a named function cannot be combined with structured output",
                param="tool_choice",
            )


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
    vocab_size: int  # of the model: prompt token ids, logit_bias keys, stop_token_ids
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
        "logit_bias": (logit_bias_type(limits.vocab_size) | None, None),
        "stop_token_ids": (stop_token_ids_type(limits.vocab_size) | None, None),
    }

    def bounded(base: type[BaseModel], **fields) -> Any:
        return create_model(base.__name__, __base__=base, __module__=__name__, **fields)

    return RequestModels(
        completion=bounded(
            CompletionRequest,
            **shared,
            prompt=(prompt_type(limits.vocab_size), ...),
            max_tokens=(integer(ge=0, le=longest) | None, 16),
            best_of=(integer(ge=1, le=limits.max_n) | None, None),
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


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


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


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


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


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a tool call: the first of each call has its id, type and name; the arguments' text
    arrives in pieces that concatenate to the whole."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
    root: str  # the model it was loaded from
    parent: str | None = None  # the base model of an adapter (none are served)
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
