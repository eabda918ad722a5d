"""How a generation step crosses the network: a WebSocket per session, or one HTTP request per step.

`SplitModel` keeps the session logic (open, recover, close) in one place and hands each step to a
transport with `step(tensors, meta) -> (tensors, meta)`. The socket (`model_party.stream`) spares
each token an HTTP request's work on both sides; `open_steps` picks it when the server offers it and
`ClientSettings.stream_steps` allows. Its failures, and what becomes of them:

- The server refuses a step: `RemoteError` with the HTTP route's status and code, so a lost session
  is `session_missing` and is reopened by a prefill, as over HTTP; 429 and 5xx are retried.
- The socket cannot be opened, or is found closed before a step leaves (a dropped connection, a
  server restart): it is reopened with the client's retry policy (`data_party.retry`), and the step
  sent on the new one. A full server's 429 or 503, on the upgrade or in a `StreamError`, is waited
  out as its Retry-After asks (`retry_after_s` in the message), within the policy's cap.
- The socket fails after a step left (dropped, or no answer within `timeout_s`): whether the
  server ran the step is unknown, so `StepLostError`, which the session logic treats as a lost
  session (a prefill with every token so far gives the same output either way).
- The server or a proxy on the way does not take the upgrade: a warning, and this step and every
  later one of this client go over HTTP.

Byte counts in `client.traffic` are message bodies, as for HTTP: the socket's framing and its
one upgrade per session, like HTTP headers, are not counted.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Protocol

import torch
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from splitprefix.data_party.remote import (
    RETRY_STATUSES,
    RemoteError,
    ServerUnreachableError,
    SplitClient,
    env_proxy,
    error_fields,
    tls_verify,
)
from splitprefix.data_party.retry import RetriesExhausted, Transient, parse_retry_after
from splitprefix.wire import schemas
from splitprefix.wire.tensors import WireFormatError, decode, encode, payload_bytes

logger = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]
STEP_LOST = "step_lost"


class StepTransport(Protocol):
    """Carries one session's steps; `close` frees what it holds (the session itself stays)."""

    def step(self, tensors: Tensors, meta: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]: ...

    def close(self) -> None: ...


class StepLostError(RemoteError):
    """A step left on a socket that failed before its answer came: the server may have run it or not."""


class StreamUnavailable(Exception):
    """The server or a proxy did not take the WebSocket upgrade; steps go over HTTP instead."""


def open_steps(client: SplitClient, session_id: str) -> StepTransport:
    """The transport for a session's steps: the socket when the server offers it, else HTTP."""
    if client.streams and client.info().generation_stream:
        return SocketSteps(client, session_id)
    return HttpSteps(client, session_id)


class HttpSteps:
    """One POST per step, with the client's retries."""

    def __init__(self, client: SplitClient, session_id: str) -> None:
        self.client = client
        self.path = schemas.SESSION_STEP_PATH.format(session_id=session_id)

    def step(self, tensors: Tensors, meta: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        return self.client.call(self.path, tensors, meta)

    def close(self) -> None:
        pass


class SocketSteps:
    """Steps over one WebSocket to the session, opened at the first step and reopened when dropped."""

    def __init__(self, client: SplitClient, session_id: str) -> None:
        self.client = client
        base = client.settings.base_url
        path = schemas.SESSION_STREAM_PATH.format(session_id=session_id)
        self.url = "ws" + base.removeprefix("http") + path  # http -> ws, https -> wss
        self._http = HttpSteps(client, session_id)
        self._socket: ClientConnection | None = None

    def step(self, tensors: Tensors, meta: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        if self.client.streams:
            try:
                return self._step(tensors, meta)
            except StreamUnavailable as error:
                logger.warning("%s; generation steps go over HTTP from now on", error)
                self.client.streams = False
                self.close()
        return self._http.step(tensors, meta)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _step(self, tensors: Tensors, meta: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        traffic = self.client.traffic
        body = encode(tensors, meta, self.client.settings.wire_dtype)

        def attempt() -> tuple[Tensors, dict[str, Any]]:
            try:
                socket = self._socket or self._connect()
                self._socket = socket
                socket.send(body)
            except (ConnectionClosed, OSError) as error:  # the step has not left: reopen, send again
                self._socket = None
                raise Transient(f"{type(error).__name__}: {error}") from None
            traffic.requests += 1
            traffic.bytes_sent += len(body)
            answer = self._receive(socket)
            if isinstance(answer, bytes):
                return self._decoded(answer, tensors)
            refused, retry_after = self._refusal(answer)
            if refused.status not in RETRY_STATUSES:
                raise refused
            raise Transient(str(refused), retry_after)

        try:
            return self.client.retry.call(attempt, self.client.count_retry)
        except RetriesExhausted as error:
            raise ServerUnreachableError(
                None,
                "unreachable",
                f"{error}. Check that `splitprefix serve` is running and reachable at "
                f"{self.client.settings.base_url}, or raise max_retries / timeout_s.",
                self.url,
            ) from None

    def _connect(self) -> ClientConnection:
        """A new socket to the session; RemoteError when the server refuses this client or session."""
        s = self.client.settings
        secure = self.url.startswith("wss")
        try:
            return connect(
                self.url,
                additional_headers=self.client.auth_headers,
                open_timeout=s.connect_timeout_s,
                close_timeout=s.connect_timeout_s,
                compression=None,  # hidden states barely compress; deflating them costs CPU per token
                max_size=None,  # an answer is at most (B, V) logits, which the server bounds
                proxy=env_proxy(s.base_url),
                ssl=_ssl_context(tls_verify(s)) if secure else None,
                # a socket held across steps, closed by `close`: not a `with` block (websockets >= 17.1)
                legacy=True,
            )
        except InvalidStatus as error:
            status, content = error.response.status_code, bytes(error.response.body or b"")
            code, detail = error_fields(content, f"HTTP {status}")
            if status == 401 or code == schemas.SESSION_MISSING:
                raise RemoteError(status, code, detail, self.url) from None
            if status in RETRY_STATUSES:  # a full server: wait as long as it asks, within the policy
                retry_after = parse_retry_after(error.response.headers.get("Retry-After"))
                raise Transient(
                    f"the upgrade was answered {status} ({code}): {detail}", retry_after
                ) from None
            raise StreamUnavailable(f"{self.url} refused the WebSocket upgrade with HTTP {status}") from None
        except InvalidHandshake as error:
            raise StreamUnavailable(f"{self.url} did not take the WebSocket upgrade: {error}") from None

    def _receive(self, socket: ClientConnection) -> bytes | str:
        """The answer to the step just sent; StepLostError if the socket failed before it came."""
        try:
            answer = socket.recv(timeout=self.client.settings.timeout_s)
        except (TimeoutError, ConnectionClosed) as error:
            self.close()  # a late answer must not be taken for the next step's
            raise StepLostError(
                None, STEP_LOST, f"no answer to a step ({type(error).__name__}: {error})", self.url
            ) from None
        self.client.traffic.bytes_received += len(answer)
        return answer

    def _decoded(self, answer: bytes, sent: Tensors) -> tuple[Tensors, dict[str, Any]]:
        try:
            out, reply = decode(answer)
        except WireFormatError as error:
            raise RemoteError(200, "bad_response", str(error), self.url) from None
        dtype, traffic = self.client.settings.wire_dtype, self.client.traffic
        traffic.payload_sent += payload_bytes(sent, dtype)
        traffic.payload_received += payload_bytes(out, dtype)  # the server answers in our dtype
        return out, reply

    def _refusal(self, answer: str) -> tuple[RemoteError, float | None]:
        """The refused step's error, and how long the server asked to wait before a retry."""
        try:
            refused = schemas.StreamError.model_validate_json(answer)
        except ValidationError:
            return RemoteError(200, "bad_response", f"not a StreamError: {answer[:500]!r}", self.url), None
        return RemoteError(refused.status, refused.code, refused.detail, self.url), refused.retry_after_s


def _ssl_context(verify: bool | ssl.SSLContext) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context
