"""OpenAI-shaped errors: every failure answers {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# OpenAI's `type` for each status we answer with
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
# seconds a client should wait before retrying a 429 (queue full) or 503 (loading, draining, engine down)
RETRY_AFTER = {429: "1", 503: "5"}


class OpenAIError(Exception):
    """An error the client should see, with the HTTP status and OpenAI fields it maps to."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    error_type = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if status in RETRY_AFTER:
        headers["Retry-After"] = RETRY_AFTER[status]
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """The most telling pydantic error as one line, plus the dotted field it concerns."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    # a union reports one error per member, the first member's first; the telling one is not about the
    # type (it comes from the member the input had the shape of), and the deepest of those (for "prompt":
    # [-1], "prompt.0 should be >= 0", not "prompt should be a valid string")
    field = _field_path(first)[:1]
    same_field = [e for e in errors if _field_path(e)[:1] == field]
    chosen = max(
        same_field, key=lambda e: (not str(e.get("type", "")).endswith("_type"), len(_field_path(e)))
    )
    param = ".".join(_field_path(chosen)) or None
    if chosen.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    message = str(chosen.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


# the labels pydantic puts in an error's location for the member of a union that failed (`str`,
# `list[constrained-int]`, `function-after[_encodable(), str]`, `TextContentPart`): not fields
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*|[0-9]+")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _field_path(error: Any) -> list[str]:
    """An error's location as the fields and indices of the request body: without "body" (FastAPI's
    prefix) and without union member labels."""
    return [str(part) for part in error.get("loc", ()) if isinstance(part, int) or _is_field(part)]


def _is_field(part: str) -> bool:
    return part != "body" and part not in _TYPE_NAMES and _FIELD_NAME.fullmatch(part) is not None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 with its own shape; OpenAI clients expect 400 and the error body
        message, param = _describe_validation_error(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, message)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        # SamplingParams and the engine raise ValueError with messages written for the client
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return error_response(500, f"internal server error: {type(exc).__name__}")
