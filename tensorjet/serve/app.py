"""The FastAPI app: OpenAI-compatible routes over one `LLM`, OpenAI-style error bodies for every
failure (4xx for anything the client sent), server-sent events for streams, and an OpenAPI schema that
says what the routes accept and answer: the same pydantic models validate the requests, bounded by this
server's engine and options (`request_models`)."""

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from tensorjet import __version__
from tensorjet.engine.structured_output import StructuredOutputError
from tensorjet.outputs import RequestOutput
from tensorjet.sampling_params import SamplingParams, StructuredOutput
from tensorjet.serve.engine_client import EngineClient, EngineFailure, Generation
from tensorjet.serve.errors import InternalErrors, failure_error, install_error_handlers
from tensorjet.serve.formatting import ChatChoiceState, CompletionChoiceState, TokenText, sse, usage
from tensorjet.serve.guard import OPEN_PATHS, RequestGuard
from tensorjet.serve.metrics import ServerMetrics
from tensorjet.serve.options import ServerOptions
from tensorjet.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    FunctionCall,
    HealthResponse,
    ModelCard,
    ModelList,
    RequestLimits,
    RequestModels,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    VersionResponse,
    request_models,
)
from tensorjet.serve.tokenization import Tokenization, fim_prompt
from tensorjet.serve.tools import ToolCallState, detect_parser, forced_tool_schema, make_parser

logger = logging.getLogger("tensorjet.serve")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response (never sent)


def build_app(llm, options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    if llm.tokenizer is None:
        raise ValueError("serving needs the model's tokenizer, and none is installed for it")
    metrics = ServerMetrics(llm, options.served_model_name)
    server = OpenAIServer(llm, options, EngineClient(llm, metrics, options), metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.tokenization.close()

    docs = not options.disable_docs
    app = FastAPI(
        title="tensorjet",
        version=__version__,
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard, options=options)
    app.add_middleware(InternalErrors)  # outermost of the two: a failing guard is a 500 too
    limits = RequestLimits(
        max_n=options.max_n,
        max_seq_len=server.max_seq_len,
        vocab_size=llm.engine.source.hf_config.vocab_size,
        tokenizer_size=len(llm.tokenizer),
    )
    _add_routes(app, server, request_models(limits), options)
    app.openapi = lambda: _openapi_schema(app, options)
    return app


def _add_routes(app: FastAPI, server: "OpenAIServer", models: RequestModels, options: ServerOptions) -> None:
    """The routes, typed with this server's request models: FastAPI reads them from the signatures (this
    module has no `from __future__ import annotations`, so these are classes, not names to resolve)."""
    key = (401,) if options.api_key is not None else ()
    generation = _errors(400, *key, 404, 413, 429, 500, 503)

    async def create_completion(request: models.completion, http_request: Request) -> Response:
        return await server.create_completion(request, http_request)

    async def create_chat_completion(request: models.chat, http_request: Request) -> Response:
        return await server.create_chat_completion(request, http_request)

    async def tokenize(request: models.tokenize) -> Response:
        return await server.tokenize(request)

    async def detokenize(request: models.detokenize) -> Response:
        return await server.detokenize(request)

    post, get = ["POST"], ["GET"]
    routes = [
        ("/v1/completions", create_completion, post, {**generation, 200: _stream_or(CompletionResponse)}),
        (
            "/v1/chat/completions",
            create_chat_completion,
            post,
            {**generation, 200: _stream_or(ChatCompletionResponse)},
        ),
        ("/v1/models", server.list_models, get, {**_errors(*key, 500), 200: {"model": ModelList}}),
        (
            "/v1/models/{model_id}",
            server.retrieve_model,
            get,
            {**_errors(*key, 404, 500), 200: {"model": ModelCard}},
        ),
        (
            "/tokenize",
            tokenize,
            post,
            {**_errors(400, *key, 404, 413, 500), 200: {"model": TokenizeResponse}},
        ),
        (
            "/detokenize",
            detokenize,
            post,
            {**_errors(400, *key, 404, 413, 500), 200: {"model": DetokenizeResponse}},
        ),
        (
            "/metrics",
            server.metrics_text,
            get,
            {200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
        ),
        ("/health", server.health, get, {**_errors(503), 200: {"model": HealthResponse}}),
        ("/version", _version, get, {200: {"model": VersionResponse}}),
    ]
    for path, endpoint, methods, responses in routes:
        if options.allowed_hosts:
            responses = {**_errors(400), **responses}  # a Host the server does not answer to
        app.add_api_route(path, endpoint, methods=methods, responses=responses, response_model=None)


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse, "description": _STATUS_TEXT[status]} for status in statuses}


_STATUS_TEXT = {
    400: "The request is malformed or asks for what the server cannot do; `param` names the field",
    401: "Missing or wrong API key",
    404: "No such model",
    413: "The request body is larger than --max_request_body_bytes",
    429: "The queue (--max_queue_size) or the server (--max_sequences) is full; retry later",
    500: "An internal error, with an id to find it in the server log",
    503: "The engine can run no request any more (a tensor-parallel worker is gone); the message says why",
}


# One server-sent event (OpenAPI 3.1 describes a stream by its events).
_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chunk as JSON (the shape of the whole response, with the choices' new "
            "text), an error body as JSON, or `[DONE]` last",
        }
    },
}


def _stream_or(model: type[BaseModel] | None) -> dict:
    """A JSON body, or server-sent events when the request asks to stream."""
    response: dict = {"content": {"text/event-stream": {"schema": _EVENT_SCHEMA}}}
    if model is not None:
        response["model"] = model
    return response


def _openapi_schema(app: FastAPI, options: ServerOptions) -> dict:
    """FastAPI's schema less the 422 it documents for every body (this server answers 400 instead),
    plus the bearer scheme when an API key is set."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                if options.api_key is not None and path not in OPEN_PATHS:
                    operation["security"] = [{"bearer": []}]
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        if options.api_key is not None:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
        app.openapi_schema = schema
    return app.openapi_schema


class OpenAIServer:
    def __init__(self, llm, options: ServerOptions, client: EngineClient, metrics: ServerMetrics) -> None:
        self.llm = llm
        self.model_name = options.served_model_name
        self.client = client
        self.metrics = metrics
        self.tokens = TokenText(llm.tokenizer)
        self.max_seq_len: int = llm.engine.max_seq_len
        self.tokenization = Tokenization(llm, self.max_seq_len)
        self.tool_call_parser = options.tool_call_parser or detect_parser(llm.tokenizer.chat_template)

    async def health(self) -> Response:
        """200 while the engine can run requests; 503 with the reason once it cannot (a tensor-parallel
        worker is gone)."""
        if self.llm.failure is not None:
            raise APIError(503, str(self.llm.failure), "service_unavailable")
        return JSONResponse({"status": "ok"})

    # ---- /v1/completions -----------------------------------------------------------------------
    async def create_completion(self, request: CompletionRequest, http_request: Request) -> Response:
        self._check_model(request.model)
        request.check_dependent_fields()
        constraint = await self._structured_output(request)
        texts, prompts = await self._completion_prompts(request.prompt, request.suffix)
        params = [self._completion_params(request, prompt, constraint) for prompt in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generation = await self._start(request_id, prompts, params, "prompt")
        keep_generated = request.max_tokens != 0
        n = request.num_choices
        states = await self._completion_states(request, texts, prompts, keep_generated)
        if request.streams:
            events = self._completion_events(request, request_id, generation, states, keep_generated)
            return _event_stream(events, generation)
        outputs = await _final_outputs(http_request, generation)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        final_usage = usage(outputs, keep_generated)  # best_of: every candidate's tokens count
        if params[0].n > n:
            outputs = [_best_of(out, n) for out in outputs]
        choices = [
            states[p * n + c.index].advance(out, c, c.text)
            for p, out in enumerate(outputs)
            for c in out.outputs
        ]
        response = CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=final_usage
        )
        return _json(response)

    async def _completion_prompts(
        self, prompt, suffix: str | None = None
    ) -> tuple[list[str | None], list[list[int]]]:
        """Normalize the four prompt shapes to a batch: (text or None, token ids) per prompt. With a
        suffix, each text prompt becomes a fill-in-the-middle prompt."""
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        if suffix is not None:
            prompt = [self._fim(p, suffix) for p in prompt]
        texts = [p if isinstance(p, str) else None for p in prompt]
        ids = [await self.tokenization.prompt(p, "prompt") if isinstance(p, str) else list(p) for p in prompt]
        if any(not p for p in ids):
            raise APIError(400, "prompt must not be empty (a text gave no tokens)", param="prompt")
        return texts, ids

    async def _completion_states(
        self,
        request: CompletionRequest,
        texts: list[str | None],
        prompts: list[list[int]],
        keep_generated: bool,
    ) -> list[CompletionChoiceState]:
        """One state per choice, prompt-major (choice index = prompt index * n + completion index)."""
        echo_texts: list[str | None] = [None] * len(prompts)
        if request.echo:
            echo_texts = [
                t if t is not None else await self.tokenization.decode(p) for t, p in zip(texts, prompts)
            ]
        logprobs = request.logprobs is not None
        n = request.num_choices
        return [
            CompletionChoiceState(p * n + j, self.tokens, logprobs, echo_texts[p], keep_generated)
            for p in range(len(prompts))
            for j in range(n)
        ]

    def _fim(self, prompt, suffix: str) -> str:
        if not isinstance(prompt, str):
            raise APIError(400, "suffix needs the prompt as text, not token ids", param="suffix")
        text = fim_prompt(self.llm.tokenizer, prompt, suffix)
        if text is None:
            raise APIError(
                400,
                "suffix needs a fill-in-the-middle prompt format, and this model's tokenizer has none "
                "(no <fim_prefix>, <fim_suffix> and <fim_middle> tokens)",
                param="suffix",
            )
        return text

    def _completion_params(
        self, request: CompletionRequest, prompt: list[int], constraint: StructuredOutput | None
    ) -> SamplingParams:
        max_tokens = request.max_tokens
        if max_tokens == 0:
            if not request.echo:
                raise APIError(400, "max_tokens=0 needs echo=true (it scores the prompt)", param="max_tokens")
            max_tokens = 1  # echo only: the engine must generate a token, which is then dropped
        max_tokens = self._fit_context(prompt, max_tokens, "prompt", "max_tokens")
        prompt_logprobs = request.logprobs if request.echo else None
        n = request.best_of or request.num_choices
        # best_of ranks candidates by their tokens' logprobs, which the engine then reports.
        logprobs = request.logprobs if n == request.num_choices else (request.logprobs or 0)
        return _sampling_params(request, max_tokens, logprobs, prompt_logprobs, constraint, n)

    async def _completion_events(
        self,
        request: CompletionRequest,
        request_id: str,
        generation: Generation,
        states: list[CompletionChoiceState],
        keep_generated: bool,
    ) -> AsyncIterator[str]:
        n = request.num_choices
        async for update in generation.updates():
            choices = [
                states[update.index * n + c.index].advance(update.output, c, c.text_diff)
                for c in update.output.outputs
            ]
            choices = [c for c in choices if c is not None]
            if choices:
                so_far = (
                    usage(generation.latest.values(), keep_generated) if request.continuous_usage else None
                )
                yield sse(
                    CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=so_far)
                )
        if request.include_usage:
            final_usage = usage(generation.latest.values(), keep_generated)
            yield sse(CompletionResponse(id=request_id, model=self.model_name, choices=[], usage=final_usage))

    # ---- /v1/chat/completions ------------------------------------------------------------------
    async def create_chat_completion(self, request: ChatCompletionRequest, http_request: Request) -> Response:
        self._check_model(request.model)
        request.check_dependent_fields()
        constraint = await self._structured_output(request)
        tools = None if request.tool_mode == "none" else [t.model_dump() for t in request.tools]
        prompt = await self.tokenization.chat_prompt(request.messages, request.add_generation_prompt, tools)
        limit_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._fit_context(prompt, request.requested_max_tokens, "messages", limit_param)
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = _sampling_params(request, max_tokens, top_logprobs, structured_output=constraint)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        generation = await self._start(request_id, [prompt], [params], "messages")
        states = [
            ChatChoiceState(j, self.tokens, top_logprobs, self._tool_state(request))
            for j in range(request.num_choices)
        ]
        if request.streams:
            return _event_stream(self._chat_events(request, request_id, generation, states), generation)
        outputs = await _final_outputs(http_request, generation)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        (out,) = outputs
        choices = []
        for c in out.outputs:
            piece = states[c.index].advance(c, c.text)
            calls = [
                ToolCall(id=d.id, function=FunctionCall(name=d.function.name, arguments=d.function.arguments))
                for d in piece.delta.tool_calls or []
            ]
            message = AssistantMessage(content=piece.delta.content, tool_calls=calls)
            choices.append(
                ChatChoice(
                    index=c.index, message=message, logprobs=piece.logprobs, finish_reason=piece.finish_reason
                )
            )
        response = ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage([out])
        )
        return _json(response)

    async def _chat_events(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        generation: Generation,
        states: list[ChatChoiceState],
    ) -> AsyncIterator[str]:
        async for update in generation.updates():
            choices = [states[c.index].advance(c, c.text_diff) for c in update.output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                so_far = usage(generation.latest.values()) if request.continuous_usage else None
                yield sse(
                    ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=so_far)
                )
        if request.include_usage:
            final_usage = usage(generation.latest.values())
            yield sse(
                ChatCompletionChunk(id=request_id, model=self.model_name, choices=[], usage=final_usage)
            )

    def _tool_state(self, request: ChatCompletionRequest) -> ToolCallState | None:
        mode = request.tool_mode
        if mode == "none":
            return None
        if mode == "named":
            return ToolCallState(mode, function_name=request.tool_choice.function.name)
        return ToolCallState(mode, parser=make_parser(self.tool_call_parser))

    async def _structured_output(self, request: SamplingRequest) -> StructuredOutput | None:
        """The request's constraint (a forced tool call's included), compiled on a worker thread: a schema,
        regex or grammar that does not compile is a 400 naming its field."""
        found = request.structured_output()
        if isinstance(request, ChatCompletionRequest) and (schema := forced_tool_schema(request)) is not None:
            found = (StructuredOutput("json", json.dumps(schema)), "tools")
        if found is None:
            return None
        constraint, param = found
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.llm.engine.grammars.compile, constraint
            )
        except StructuredOutputError as error:
            raise APIError(400, str(error), param=param) from error
        return constraint

    # ---- the rest ------------------------------------------------------------------------------
    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, root=self.llm.engine.source.name, max_model_len=self.max_seq_len)

    async def list_models(self) -> Response:
        return _json(ModelList(data=[self._model_card()]))

    async def retrieve_model(self, model_id: str) -> Response:
        self._check_model(model_id)
        return _json(self._model_card())

    async def tokenize(self, request: TokenizeRequest) -> Response:
        self._check_model(request.model)
        if request.messages is not None:
            tokens = await self.tokenization.chat(request.messages, request.add_generation_prompt)
        else:
            tokens = await self.tokenization.encode(request.prompt, request.add_special_tokens)
        return _json(TokenizeResponse(count=len(tokens), max_model_len=self.max_seq_len, tokens=tokens))

    async def detokenize(self, request: DetokenizeRequest) -> Response:
        self._check_model(request.model)
        return _json(DetokenizeResponse(prompt=await self.tokenization.decode(request.tokens)))

    async def metrics_text(self) -> Response:
        body = await asyncio.to_thread(self.metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def _fit_context(
        self, prompt: list[int], max_tokens: int | None, prompt_param: str, limit_param: str
    ) -> int:
        """max_tokens, checked against the context (never cut to fit: the client would get less than it
        asked for without knowing why); unset, it is what the context leaves, as OpenAI does."""
        if len(prompt) >= self.max_seq_len:
            raise APIError(
                400,
                f"prompt is {len(prompt)} tokens long, the maximum sequence length is {self.max_seq_len} "
                "(prompt plus at least one generated token)",
                param=prompt_param,
            )
        if max_tokens is None:
            return self.max_seq_len - len(prompt)
        if len(prompt) + max_tokens > self.max_seq_len:
            raise APIError(
                400,
                f"the maximum sequence length is {self.max_seq_len} tokens: the prompt takes {len(prompt)} "
                f"and {limit_param}={max_tokens} asks for {len(prompt) + max_tokens} in all",
                param=limit_param,
            )
        return max_tokens

    async def _start(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams], prompt_param: str
    ) -> Generation:
        try:
            return await self.client.start(request_id, prompts, params)
        except ValueError as error:
            raise APIError.bad_request(error, param=prompt_param) from error


def _sampling_params(
    request: SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured_output: StructuredOutput | None = None,
    n: int | None = None,
) -> SamplingParams:
    try:
        return request.sampling_params(max_tokens, logprobs, prompt_logprobs, structured_output, n)
    except ValueError as error:
        raise APIError.bad_request(error) from error


def _best_of(out: RequestOutput, n: int) -> RequestOutput:
    """The n candidates with the highest cumulative logprob, renumbered 0 .. n - 1."""

    def cumulative(c) -> float:
        return sum(entry[token] for token, entry in zip(c.token_ids, c.logprobs or []))

    best = sorted(out.outputs, key=cumulative, reverse=True)[:n]
    return dataclasses.replace(out, outputs=[dataclasses.replace(c, index=i) for i, c in enumerate(best)])


async def _final_outputs(http_request: Request, generation: Generation) -> list[RequestOutput] | None:
    """Run a non-streaming request to the end; None (and its engine requests aborted) if the client
    disconnects first, so an abandoned long generation does not keep its batch slot and KV blocks."""
    work = asyncio.ensure_future(generation.final_outputs())
    gone = asyncio.ensure_future(_disconnected(http_request))
    finished = False
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finished = work in done
    finally:
        gone.cancel()
        if not finished:
            work.cancel()
            generation.close()
    return work.result() if finished else None


async def _disconnected(http_request: Request) -> None:
    """Returns once the client has gone (the body is already read, so only a disconnect can arrive)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


class _SSEResponse(StreamingResponse):
    """Closes the event generator however the stream ends (a client that left mid-stream included),
    so the request is aborted and its KV blocks freed right away rather than at garbage collection."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _event_stream(events: AsyncIterator[str], generation: Generation) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except EngineFailure as error:
            # The headers are sent: the error goes in the stream; a 500's details only in the log (the
            # engine loop has logged the traceback).
            logger.error("%s failed: %s", generation.request_id, error)
            yield sse(failure_error(error, generation.request_id).body())
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    return _SSEResponse(body(), media_type="text/event-stream")


async def _version() -> Response:
    return JSONResponse({"version": __version__})
