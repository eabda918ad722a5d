"""Generation steps over a WebSocket: one socket per session, one binary message per step.

Each HTTP step costs both sides a request's parsing, routing and dependency work, 1-2 ms of CPU per
token on 2 cores against a step's 10 ms of compute; a socket pays that once per session. Opening,
closing and training stay on HTTP. The protocol, at `wire.schemas.SESSION_STREAM_PATH`:

- The upgrade request carries the HTTP routes' bearer token. A missing or wrong token is refused
  with HTTP 401 `unauthorized`, an unknown, expired or another party's session with HTTP 404
  `session_missing`, each with the JSON `ErrorBody` of the HTTP routes, before the socket opens
  (a server without the denial-response extension closes with 1008 instead: HTTP 403).
  A party over its share of sockets (`max_streams_per_client`, `max_streams_per_session`) is
  refused the same way with HTTP 429 `too_many_streams` and `Retry-After` (`model_party.limits`).
- Each binary message is one step: the body of `POST SESSION_STEP_PATH`, run by the same
  `GenerationBackend.step`. The answer is one binary message, the HTTP answer's body.
- A refused step is answered by a text message, `StreamError` JSON: the status, code and detail
  the HTTP route would give, and for 429 and 503 its Retry-After as `retry_after_s`; the socket
  stays open. A text message from the client is refused
  the same way (400 `bad_message`).
- Close codes: 1000 when the client closes; 1012 when the server shuts down (uvicorn); 1009 for a
  message over `--max-request-bytes` (`splitprefix serve` sets uvicorn's limit); 4408
  (`STREAM_IDLE_CLOSE`) when no message came for `session_ttl_s`, after which the session has
  expired too.
"""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import FastAPI, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from splitprefix.model_party.auth import TokenAuth, Unauthorized
from splitprefix.model_party.exchange import answer, refusal
from splitprefix.model_party.generation import GenerationBackend
from splitprefix.model_party.limits import RETRY_AFTER_S
from splitprefix.model_party.validation import RequestError
from splitprefix.wire import schemas

DENIAL_EXTENSION = "websocket.http.response"


def add_stream_route(app: FastAPI, generation: GenerationBackend) -> None:
    """The WebSocket route of generation steps, on the app that serves the sessions over HTTP."""
    settings = generation.backend.settings

    @app.websocket(schemas.SESSION_STREAM_PATH)
    async def stream(websocket: WebSocket, session_id: str) -> None:
        auth: TokenAuth = app.state.auth
        try:
            client = auth.client_id(websocket.headers.get("authorization"))
            # the same check as a step's, so another party's session is refused as an unknown one
            await run_in_threadpool(generation.check_session, session_id, client)
        except (Unauthorized, RequestError) as error:
            await _deny(websocket, error)
            return
        await websocket.accept()
        path = websocket.url.path
        step = partial(generation.step, session_id)
        inline = partial(generation.step_async, session_id)
        try:
            while (body := await _next_message(websocket, settings.session_ttl_s)) is not None:
                try:
                    if not isinstance(body, bytes):
                        raise RequestError(
                            400, "bad_message", "send each step as a binary message (a safetensors blob)"
                        )
                    app.state.admission.check(schemas.SESSION_STEP_PATH, body)  # before decoding
                    out = await answer(path, body, settings.max_request_bytes, step, client, inline)
                except Exception as error:  # every refusal is an answer; the socket serves on
                    status, code, detail = refusal(error)
                    wait = float(RETRY_AFTER_S) if status in (429, 503) else None  # as the HTTP route's
                    refused = schemas.StreamError(status=status, code=code, detail=detail, retry_after_s=wait)
                    await websocket.send_text(refused.model_dump_json(exclude_none=True))
                    continue
                await websocket.send_bytes(out)
        except WebSocketDisconnect:
            return  # the client went away mid-answer: nothing to tell it


async def _next_message(websocket: WebSocket, idle_s: float) -> bytes | str | None:
    """The next message's bytes (or text); None once the client closed or the socket was closed idle."""
    try:
        message = await asyncio.wait_for(websocket.receive(), idle_s)
    except asyncio.TimeoutError:
        await websocket.close(schemas.STREAM_IDLE_CLOSE, "no step for the session's idle time; it expired")
        return None
    if message["type"] == "websocket.disconnect":
        return None
    body = message.get("bytes")
    return body if body is not None else str(message.get("text", ""))


async def _deny(websocket: WebSocket, error: Unauthorized | RequestError) -> None:
    """Refuse the upgrade with the HTTP routes' status and error body, where the server allows it."""
    if DENIAL_EXTENSION not in websocket.scope.get("extensions", {}):
        await websocket.close(1008)
        return
    if isinstance(error, Unauthorized):
        status, code, headers = 401, "unauthorized", {"WWW-Authenticate": "Bearer"}
    else:
        status, code, headers = error.status, error.code, {}
    body = schemas.ErrorBody(code=code, detail=str(error)).model_dump()
    await websocket.send_denial_response(JSONResponse(body, status_code=status, headers=headers))
