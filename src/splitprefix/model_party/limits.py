"""Per-party limits on what a data party holds open at once: requests in flight and WebSockets.

Without them one party (or one leaked token) could fill the server by itself: many slow uploads
of `max_request_bytes` each, or any number of generation sockets on one session. Each limit is
counted per party (the bearer token's name; every request is 'anonymous' without a tokens file)
and answered with 429 and `Retry-After`, in the app's `ErrorBody`:

    429 too_many_requests   the party has `max_requests_per_client` HTTP requests in flight
    429 too_many_streams    the party holds `max_streams_per_client` generation sockets, or the
                            session `max_streams_per_session`

A request without a valid token is not counted and goes on to be refused with 401 by the route.
The global limit, on connections of all parties together, is uvicorn's `limit_concurrency`
(`max_connections`, set by `splitprefix serve`), which answers 503 before a request is read.
The counters live on the event loop, which runs every ASGI call, so they need no lock.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from splitprefix.model_party.auth import TokenAuth, Unauthorized
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas

RETRY_AFTER_S = 1
_STREAM = re.compile("^" + schemas.SESSION_STREAM_PATH.replace("{session_id}", "(?P<session>[^/]+)") + "$")


class PartyLimits:
    """ASGI middleware that counts each party's requests in flight and generation sockets."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.max_requests = settings.max_requests_per_client
        self.max_streams = settings.max_streams_per_client
        self.max_per_session = settings.max_streams_per_session
        self.requests: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()
        self.session_streams: Counter[tuple[str, str]] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        party = _party(scope) if scope["type"] in ("http", "websocket") else None
        if party is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._request(party, scope, receive, send)
        else:
            await self._socket(party, scope, receive, send)

    async def _request(self, party: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.requests[party] >= self.max_requests:
            detail = (
                f"you have {self.requests[party]} requests in flight, this server's limit per data party "
                f"(max_requests_per_client = {self.max_requests}); wait for their answers before sending more"
            )
            await _refusal("too_many_requests", detail)(scope, receive, send)
            return
        self.requests[party] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            _release(self.requests, party)

    async def _socket(self, party: str, scope: Scope, receive: Receive, send: Send) -> None:
        match = _STREAM.match(scope.get("path", ""))
        if match is None:
            await self.app(scope, receive, send)
            return
        # keyed by party too, so that another party's attempts never count against this session
        session = (party, match["session"])
        detail = None
        if self.streams[party] >= self.max_streams:
            detail = f"you hold {self.streams[party]} generation sockets, the limit per data party ({self.max_streams})"
        elif self.session_streams[session] >= self.max_per_session:
            detail = (
                f"this session has {self.max_per_session} sockets open, its limit (max_streams_per_session)"
            )
        if detail is not None:
            await _deny(scope, receive, send, detail + "; close one, or step over HTTP")
            return
        self.streams[party] += 1
        self.session_streams[session] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            _release(self.streams, party)
            _release(self.session_streams, session)


def _party(scope: Scope) -> str | None:
    """The party behind the request's token, or None when the token is missing or wrong."""
    auth: TokenAuth = scope["app"].state.auth
    headers = dict(scope.get("headers") or [])
    value = headers.get(b"authorization")
    try:
        return auth.client_id(None if value is None else value.decode("latin-1"))
    except Unauthorized:
        return None


def _release(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # so that the counters stay as small as what is open now


def _refusal(code: str, detail: str) -> JSONResponse:
    body = schemas.ErrorBody(code=code, detail=detail).model_dump()
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})


async def _deny(scope: Scope, receive: Receive, send: Send, detail: str) -> None:
    """Refuse the upgrade with 429, or close with 1008 where the server cannot answer HTTP."""
    websocket = WebSocket(scope, receive, send)
    await websocket.receive()  # the client's connect, which the ASGI protocol answers first
    if "websocket.http.response" in scope.get("extensions", {}):
        await websocket.send_denial_response(_refusal("too_many_streams", detail))
    else:
        await websocket.close(1008, "too_many_streams")
