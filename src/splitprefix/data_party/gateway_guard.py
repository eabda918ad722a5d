"""What the gateway lets in: an API key, bounded bodies and requests, and OpenAI-style errors.

The gateway holds the data party's prefix and serves whoever reaches it, so off loopback it needs
an API key (`splitprefix gateway` refuses to start without one unless `--insecure`). Clients send
it as OpenAI clients do, `Authorization: Bearer <key>`; `/v1/health` alone answers without it.
Every refusal has the body OpenAI clients parse, `{"error": {"message", "type", "param", "code"}}`:

    401 invalid_request_error / invalid_api_key        missing or wrong API key
    413 invalid_request_error / request_too_large      body over max_request_bytes
    429 rate_limit_error      / rate_limit_exceeded    max_concurrent requests in flight (Retry-After)
    400 invalid_request_error / max_tokens_exceeded    max_tokens over max_tokens_limit
    400 invalid_request_error / context_length_exceeded  a prompt over max_prompt_tokens
    400 invalid_request_error / too_many_prompts       more prompts in one request than max_prompts
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitprefix.data_party.gateway_settings import GatewaySettings

OPEN_PATHS = ("/v1/health",)
RETRY_AFTER_S = 1


class OpenAIError(HTTPException):
    """A request the gateway refuses; becomes an OpenAI-style error body.

    An HTTPException, so that FastAPI lets it through when it is raised while the body is read."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(status, message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        return openai_error(self.status, self.message, code=self.code, param=self.param)


def openai_error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error body OpenAI's API answers with, which its clients turn into typed exceptions."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def check_asked_tokens(asked: int | None, settings: GatewaySettings) -> None:
    if asked is not None and asked > settings.max_tokens_limit:
        raise OpenAIError(
            400,
            f"max_tokens is {asked}; this gateway generates at most {settings.max_tokens_limit} tokens per "
            "request",
            "max_tokens_exceeded",
            "max_tokens",
        )


def check_prompts(lengths: list[int], param: str, settings: GatewaySettings) -> None:
    """Refuse too many prompts, or one longer than `max_prompt_tokens` (`lengths` in tokens)."""
    if len(lengths) > settings.max_prompts:
        raise OpenAIError(
            400,
            f"{len(lengths)} prompts in one request; this gateway takes at most {settings.max_prompts}",
            "too_many_prompts",
            param,
        )
    longest = max(lengths, default=0)
    if longest > settings.max_prompt_tokens:
        raise OpenAIError(
            400,
            f"the prompt is {longest} tokens; this gateway accepts at most {settings.max_prompt_tokens}. "
            "Shorten the prompt or the conversation",
            "context_length_exceeded",
            param,
        )


class GatewayGuard:
    """ASGI middleware: the API key, the body size and the count of requests in flight."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app, self.settings = app, settings
        self._key = None if settings.api_key is None else settings.api_key.encode()
        self.in_flight = 0  # the event loop runs every ASGI call, so no lock is needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, _bounded(receive, self.settings.max_request_bytes), send)
        finally:
            self.in_flight -= 1

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._key is not None and not self._authorized(headers.get("authorization", "")):
            return openai_error(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>' with the gateway's key",
                code="invalid_api_key",
            )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_request_bytes:
            return _too_large(self.settings.max_request_bytes)
        if self.in_flight >= self.settings.max_concurrent:
            return openai_error(
                429,
                f"the gateway is serving its maximum of {self.settings.max_concurrent} requests; retry shortly",
                "rate_limit_error",
                "rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return None

    def _authorized(self, authorization: str) -> bool:
        assert self._key is not None
        scheme, _, key = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self._key)


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that refuses a body (sent without Content-Length) once it grows past `limit`."""
    size = 0

    async def bounded() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise OpenAIError(413, _too_large_text(limit), "request_too_large")
        return message

    return bounded


def _too_large(limit: int) -> JSONResponse:
    return openai_error(413, _too_large_text(limit), code="request_too_large")


def _too_large_text(limit: int) -> str:
    return f"the request body is over this gateway's limit of {limit} bytes"


def error_handlers() -> dict[Any, Any]:
    """FastAPI exception handlers that answer every refusal with an OpenAI-style body."""

    async def refused(_: Any, error: Exception) -> JSONResponse:
        if isinstance(error, OpenAIError):
            return error.response()
        assert isinstance(error, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        headers = dict(error.headers) if error.headers else None
        return openai_error(error.status_code, str(error.detail), code=code, headers=headers)

    async def invalid(_: Any, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = [(".".join(str(p) for p in e["loc"] if p != "body"), e["msg"]) for e in error.errors()]
        text = "; ".join(f"{where or 'body'}: {why}" for where, why in problems)
        param = problems[0][0] or None if problems else None
        return openai_error(400, f"invalid request: {text}", code="invalid_value", param=param)

    return {StarletteHTTPException: refused, RequestValidationError: invalid}
