"""The FastAPI app: OpenAI-compatible routes over one `LLM`, OpenAI-style error bodies for every
failure (4xx for anything the client sent), and server-sent events for streams."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from tensorjet import __version__
from tensorjet.outputs import RequestOutput
from tensorjet.sampling_params import SamplingParams
from tensorjet.serve.engine_client import EngineClient, EngineFailure, Generation
from tensorjet.serve.formatting import ChatChoiceState, CompletionChoiceState, TokenText, sse, usage
from tensorjet.serve.metrics import ServerMetrics
from tensorjet.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
)

logger = logging.getLogger("tensorjet.serve")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response (never sent)


def build_app(llm, served_model_name: str, max_queue_size: int | None = None) -> FastAPI:
    if llm.tokenizer is None:
        raise ValueError("serving needs the model's tokenizer, and none is installed for it")
    metrics = ServerMetrics(llm)
    server = OpenAIServer(llm, served_model_name, EngineClient(llm, metrics, max_queue_size), metrics)
    app = FastAPI(title="tensorjet", version=__version__)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineFailure, _engine_failure)
    app.add_exception_handler(Exception, _internal_error)
    app.post("/v1/completions")(server.create_completion)
    app.post("/v1/chat/completions")(server.create_chat_completion)
    app.get("/v1/models")(server.list_models)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/metrics")(server.metrics_text)
    app.get("/health")(server.health)
    app.get("/version")(_version)
    return app


class OpenAIServer:
    def __init__(self, llm, model_name: str, client: EngineClient, metrics: ServerMetrics) -> None:
        self.llm = llm
        self.model_name = model_name
        self.client = client
        self.metrics = metrics
        self.tokens = TokenText(llm.tokenizer)
        self.max_seq_len: int = llm.engine.max_seq_len

    async def health(self) -> Response:
        """200 while the engine can run requests; 503 with the reason once it cannot (a tensor-parallel
        worker is gone)."""
        if self.llm.failure is not None:
            return JSONResponse({"status": "error", "message": str(self.llm.failure)}, status_code=503)
        return JSONResponse({"status": "ok"})

    # ---- /v1/completions -----------------------------------------------------------------------
    async def create_completion(self, request: CompletionRequest, http_request: Request) -> Response:
        self._check_model(request.model)
        texts, prompts = self._completion_prompts(request.prompt)
        params = [self._completion_params(request, prompt) for prompt in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generation = await self._start(request_id, prompts, params, "prompt")
        keep_generated = request.max_tokens != 0
        states = self._completion_states(request, texts, prompts, keep_generated)
        if request.stream:
            events = self._completion_events(request, request_id, generation, states, keep_generated)
            return _event_stream(events, generation)
        outputs = await _final_outputs(http_request, generation)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            states[p * request.n + c.index].advance(out, c, c.text)
            for p, out in enumerate(outputs)
            for c in out.outputs
        ]
        response = CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage(outputs, keep_generated)
        )
        return _json(response)

    def _completion_prompts(self, prompt) -> tuple[list[str | None], list[list[int]]]:
        """Normalize the four prompt shapes to a batch: (text or None, token ids) per prompt."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt or any(len(p) == 0 for p in prompt):
            raise APIError(400, "prompt must not be empty", param="prompt")
        texts = [p if isinstance(p, str) else None for p in prompt]
        ids = [self.llm.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        return texts, ids

    def _completion_states(
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
                t if t is not None else self.llm.tokenizer.decode(p) for t, p in zip(texts, prompts)
            ]
        logprobs = request.logprobs is not None
        return [
            CompletionChoiceState(p * request.n + j, self.tokens, logprobs, echo_texts[p], keep_generated)
            for p in range(len(prompts))
            for j in range(request.n)
        ]

    def _completion_params(self, request: CompletionRequest, prompt: list[int]) -> SamplingParams:
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = self._rest_of_context(prompt)
        elif max_tokens == 0:
            if not request.echo:
                raise APIError(400, "max_tokens=0 needs echo=true (it scores the prompt)", param="max_tokens")
            max_tokens = 1  # echo only: the engine must generate a token, which is then dropped
        prompt_logprobs = request.logprobs if request.echo else None
        return _sampling_params(request, max_tokens, request.logprobs, prompt_logprobs)

    async def _completion_events(
        self,
        request: CompletionRequest,
        request_id: str,
        generation: Generation,
        states: list[CompletionChoiceState],
        keep_generated: bool,
    ) -> AsyncIterator[str]:
        async for update in generation.updates():
            choices = [
                states[update.index * request.n + c.index].advance(update.output, c, c.text_diff)
                for c in update.output.outputs
            ]
            choices = [c for c in choices if c is not None]
            if choices:
                yield sse(CompletionResponse(id=request_id, model=self.model_name, choices=choices))
        if request.include_usage:
            final_usage = usage(generation.latest.values(), keep_generated)
            yield sse(CompletionResponse(id=request_id, model=self.model_name, choices=[], usage=final_usage))

    # ---- /v1/chat/completions ------------------------------------------------------------------
    async def create_chat_completion(self, request: ChatCompletionRequest, http_request: Request) -> Response:
        self._check_model(request.model)
        prompt = self._chat_prompt(request.messages, request.add_generation_prompt)
        max_tokens = request.requested_max_tokens or self._rest_of_context(prompt)
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = _sampling_params(request, max_tokens, top_logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        generation = await self._start(request_id, [prompt], [params], "messages")
        states = [ChatChoiceState(j, self.tokens, top_logprobs) for j in range(request.n)]
        if request.stream:
            return _event_stream(self._chat_events(request, request_id, generation, states), generation)
        outputs = await _final_outputs(http_request, generation)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        (out,) = outputs
        choices = []
        for c in out.outputs:
            piece = states[c.index].advance(c, c.text)
            message = AssistantMessage(content=piece.delta.content)
            choices.append(
                ChatChoice(
                    index=c.index, message=message, logprobs=piece.logprobs, finish_reason=c.finish_reason
                )
            )
        response = ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage([out])
        )
        return _json(response)

    def _chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        try:
            conversation = [m.as_template_message() for m in messages]
            return self.llm.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        except (ValueError, TemplateError) as error:
            raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from error

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
                yield sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices))
        if request.include_usage:
            final_usage = usage(generation.latest.values())
            yield sse(
                ChatCompletionChunk(id=request_id, model=self.model_name, choices=[], usage=final_usage)
            )

    # ---- the rest ------------------------------------------------------------------------------
    async def list_models(self) -> Response:
        return _json(ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_seq_len)]))

    async def tokenize(self, request: TokenizeRequest) -> Response:
        self._check_model(request.model)
        if request.messages is not None:
            tokens = self._chat_prompt(request.messages, request.add_generation_prompt)
        else:
            tokens = self.llm.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return _json(TokenizeResponse(count=len(tokens), max_model_len=self.max_seq_len, tokens=tokens))

    async def detokenize(self, request: DetokenizeRequest) -> Response:
        self._check_model(request.model)
        vocab = len(self.llm.tokenizer)
        if any(not 0 <= t < vocab for t in request.tokens):
            raise APIError(400, f"tokens must be integers in [0, {vocab})", param="tokens")
        return _json(DetokenizeResponse(prompt=self.llm.tokenizer.decode(request.tokens)))

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

    def _rest_of_context(self, prompt: list[int]) -> int:
        """OpenAI's default for an unset max_tokens: as much as the context leaves (at least 1, so an
        over-long prompt gets the engine's message about the length limit)."""
        return max(1, self.max_seq_len - len(prompt))

    async def _start(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams], prompt_param: str
    ) -> Generation:
        try:
            return await self.client.start(request_id, prompts, params)
        except ValueError as error:
            raise APIError.bad_request(error, param=prompt_param) from error


def _sampling_params(
    request: SamplingRequest, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    try:
        return request.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except ValueError as error:
        raise APIError.bad_request(error) from error


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
            logger.error("%s: %s", generation.request_id, error)
            yield sse(error.api_error().body())
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    return _SSEResponse(body(), media_type="text/event-stream")


async def _version() -> Response:
    return JSONResponse({"version": __version__})


# ---- errors ------------------------------------------------------------------------------------
def _error_response(request: Request, error: APIError) -> JSONResponse:
    logger.info("%s %s -> %d %s", request.method, request.url.path, error.status, error.message)
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return _error_response(request, error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Pydantic's errors as one 400 naming the field (FastAPI's default would be a 422)."""
    problems = error.errors()
    if problems and problems[0]["type"] == "json_invalid":
        detail = problems[0].get("ctx", {}).get("error", "")
        return _error_response(request, APIError(400, f"malformed JSON body: {detail}".rstrip(": ")))
    messages, param = [], None
    for problem in problems[:3]:
        loc = [str(part) for part in problem["loc"] if part != "body"]
        param = param or (loc[0] if loc else None)
        messages.append(f"{'.'.join(loc) or 'body'}: {problem['msg']}")
    return _error_response(request, APIError(400, "; ".join(messages), param=param))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return _error_response(request, APIError(error.status_code, str(error.detail), type=kind))


async def _engine_failure(request: Request, error: EngineFailure) -> JSONResponse:
    logger.error("%s %s: %s", request.method, request.url.path, error)
    return JSONResponse(error.api_error().body(), error.status)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(APIError(500, f"internal error: {error}", type="internal_error").body(), 500)
