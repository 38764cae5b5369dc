"""Every failure as an OpenAI error body: 4xx for what the client sent, naming the field where there is
one; a 500 says only that it happened and under which id, and the log has its traceback, once; a 503 (an
engine that can run no request any more) says why."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tensorjet.serve.engine_client import EngineFailure
from tensorjet.serve.protocol import APIError

logger = logging.getLogger("tensorjet.serve")

_STATUS_TYPES = {404: "not_found_error", 429: "rate_limit_error"}


def error_response(
    method: str, path: str, error: APIError, headers: dict[str, str] | None = None
) -> JSONResponse:
    logger.info("%s %s -> %d %s", method, path, error.status, error.message)
    headers = dict(headers or {})
    if error.status == 429:
        headers["Retry-After"] = "1"
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


def internal_error(request_id: str) -> APIError:
    return APIError(
        500,
        f"internal server error (request id {request_id}); the server log has the details",
        "internal_error",
    )


def failure_error(error: Exception, request_id: str) -> APIError:
    """What the client sees of an error that escaped a request: an engine that can run no request says
    why (503); anything else is a 500 that names only the request id."""
    if isinstance(error, EngineFailure) and error.status == 503:
        return APIError(503, str(error), "service_unavailable")
    return internal_error(request_id)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(request.method, request.url.path, error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Pydantic's errors as one 400 naming the field (FastAPI's default would be a 422)."""
    problems = error.errors()
    if problems and problems[0]["type"] == "json_invalid":
        detail = problems[0].get("ctx", {}).get("error", "")
        error = APIError(400, f"malformed JSON body: {detail}".rstrip(": "))
        return error_response(request.method, request.url.path, error)
    messages: dict[str, None] = {}  # in order, each once (a union repeats one for every member)
    param = None
    for problem in problems:
        path = _field_path(problem["loc"])
        param = param or (path[0] if path else None)
        messages[f"{'.'.join(path) or 'body'}: {problem['msg'].removeprefix('Value error, ')}"] = None
    message = "; ".join(list(messages)[:3])
    return error_response(request.method, request.url.path, APIError(400, message, param=param))


def _field_path(loc: tuple) -> list[str]:
    """An error's field names and list indices, less pydantic's labels of union members (`str`,
    `list[int]`, `function-after[...]`)."""
    return [
        str(part)
        for part in loc
        if part != "body"
        and (isinstance(part, int) or not ("[" in part or "(" in part or part in _MEMBER_LABELS))
    ]


_MEMBER_LABELS = {"str", "int", "float", "bool", "list", "dict"}


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Routing's 404 and 405 (with its Allow header), and the body-size limit's 413."""
    kind = _STATUS_TYPES.get(error.status_code, "invalid_request_error")
    api_error = APIError(error.status_code, str(error.detail), type=kind)
    return error_response(request.method, request.url.path, api_error, error.headers)


class InternalErrors:
    """Turns an exception that escaped a route into a 500 with a fresh request id, logging its traceback
    once (Starlette's own handler would log it, then re-raise it for the server to log again) and showing
    the client none of it. Inside the app's middleware, so every route and guard is covered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            request_id = uuid.uuid4().hex
            if isinstance(error, EngineFailure):  # the engine loop has logged its traceback
                logger.error(
                    "%s %s failed (request id %s): %s", scope["method"], scope["path"], request_id, error
                )
            else:
                logger.exception("%s %s failed (request id %s)", scope["method"], scope["path"], request_id)
            if not started:  # a stream already under way can only be cut short
                api_error = failure_error(error, request_id)
                await JSONResponse(api_error.body(), status_code=api_error.status)(scope, receive, send)
