"""The data party's link to the model party's server: the HTTP client `SplitClient`.

Every call has a timeout and bounded retries with exponential backoff that honours `Retry-After`
(`data_party.retry`), all set in `ClientSettings`.
`data_party.remote_top` builds the server's layers into a local module on top of it.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from pydantic import ValidationError

from splitprefix.data_party.retry import RetriesExhausted, RetryPolicy, Transient, parse_retry_after
from splitprefix.errors import ConfigError, SplitPrefixError
from splitprefix.model.emulator import EmulatorManifest
from splitprefix.wire import schemas
from splitprefix.wire.schemas import HeadMode, ModelInfo
from splitprefix.wire.tensors import (
    CONTENT_TYPE,
    WIRE_DTYPES,
    WireDtype,
    WireFormatError,
    decode,
    encode,
    payload_bytes,
)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Answers that say "try again later" rather than "your request is wrong"."""


@dataclass(frozen=True)
class ClientSettings:
    """How the data party reaches the model party's server. Every network knob lives here."""

    server_url: str
    """Base URL of `splitprefix serve`, e.g. http://127.0.0.1:8000."""
    token: str | None = None
    """Bearer token the model party issued to this data party; unset when the server has no tokens file."""
    head: HeadMode = "server"
    """Where the final norm and LM head run: 'server' sends the targets in clear; 'client' keeps them off
    the wire, but the model party can still recover them from the gradients it is sent (`wire.disclosure`)."""
    client_layers: int = 0
    """M: also keep the top M layers, the norm and the head here (the U-shaped split, head=client): the
    server runs [K, L - M) and the gradient sent back is dL/dh_{L-M}; the emulator must ship them
    (`emulate --client-layers` >= M)."""
    wire_dtype: WireDtype = "fp32"
    """Float dtype of tensors on the wire: fp32 is exact, bf16 and fp16 halve the traffic."""
    stream_steps: bool = True
    """Send generation steps over a WebSocket when the server offers one; off: one HTTP request each."""
    keep_graph: bool = True
    """The server holds the forward's graph until the backward; off (recompute), it is stateless: every
    backward resends the forward inputs and the server recomputes."""
    timeout_s: float = 120.0
    """Seconds to wait for the answer to one request."""
    connect_timeout_s: float = 5.0
    """Seconds to wait for a connection."""
    max_retries: int = 5
    """Retries of one call on network errors, timeouts, 429 and 5xx (0 = fail at once)."""
    backoff_s: float = 0.5
    """Wait before the first retry; it doubles with every retry."""
    backoff_max_s: float = 10.0
    """Cap on the wait between retries."""
    verify_tls: bool = True
    """Check the server's TLS certificate (https only)."""
    ca_path: Path | None = None
    """CA bundle that signed the server's certificate, for a self-signed model party."""

    def __post_init__(self) -> None:
        if not self.server_url.startswith(("http://", "https://")):
            raise ConfigError(f"server_url must start with http:// or https://; got {self.server_url!r}")
        if self.head not in ("server", "client"):
            raise ConfigError(f"head must be 'server' or 'client'; got {self.head!r}")
        if not isinstance(self.client_layers, int) or self.client_layers < 0:
            raise ConfigError(f"client_layers must be an integer >= 0; got {self.client_layers!r}")
        if self.client_layers and self.head != "client":
            raise ConfigError(
                f"client_layers={self.client_layers} keeps the head at the data party: use head=client"
            )
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}; got {self.wire_dtype!r}")
        if not (self.timeout_s > 0 and self.connect_timeout_s > 0):
            raise ConfigError(
                f"timeouts must be > 0; got timeout_s={self.timeout_s}, connect_timeout_s={self.connect_timeout_s}"
            )
        if self.max_retries < 0 or self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ConfigError(
                "need max_retries >= 0 and 0 <= backoff_s <= backoff_max_s; got "
                f"{self.max_retries}, {self.backoff_s}, {self.backoff_max_s}"
            )
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ConfigError("token must be a non-empty string without whitespace")
        if self.ca_path is not None and not Path(self.ca_path).is_file():
            raise ConfigError(f"ca_path {self.ca_path} is not a file")

    @property
    def base_url(self) -> str:
        return self.server_url.rstrip("/")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.backoff_s, self.backoff_max_s)


def _client_layer_diffs(m: int, info: ModelInfo, manifest: EmulatorManifest) -> list[str]:
    """What keeps a data party from keeping the top M layers against this server and emulator."""
    if not m:
        return []
    diffs = []
    if m > info.max_client_layers:
        diffs.append(f"client_layers: the server allows M <= {info.max_client_layers}, client asks {m}")
    if m > manifest.client_layers:
        diffs.append(
            f"client_layers: the emulator ships the last {manifest.client_layers} layers exactly, client asks {m}"
        )
    elif info.fingerprints.top_sha256.get(str(m)) not in (None, manifest.top_sha256[str(m)]):
        diffs.append(f"top_sha256 of the last {m} layers differs")
    return diffs


class RemoteError(SplitPrefixError):
    """The server refused a request; `status`, `code` and `detail` are what it answered."""

    def __init__(self, status: int | None, code: str, detail: str, url: str) -> None:
        where = f"{url} answered {status} ({code})" if status is not None else f"{url}: {code}"
        super().__init__(f"{where}: {detail}")
        self.status, self.code, self.detail, self.url = status, code, detail, url


class ServerUnreachableError(RemoteError):
    """Every attempt of a call failed with a connection error, a timeout or a retryable status."""


class IncompatibleServerError(SplitPrefixError, ValueError):
    """The server runs another model, split or protocol than the data party's emulator was cut from."""


@dataclass
class Traffic:
    """Bytes of message bodies that crossed the network, retries included."""

    bytes_sent: int = 0
    bytes_received: int = 0
    requests: int = 0
    retries: int = 0
    recomputes: int = 0
    """Backwards resent with the forward inputs because the server had lost the graph."""
    payload_sent: int = 0
    """The tensors' own size in the messages that got an answer: the floor for `bytes_sent`."""
    payload_received: int = 0
    """The tensors' own size in the answers: the floor for `bytes_received`."""

    def snapshot(self) -> dict[str, int]:
        return dict(vars(self))


class SplitClient:
    """HTTP client of the split-training protocol (`wire.schemas`), with timeouts and bounded retries."""

    def __init__(self, settings: ClientSettings, transport: httpx.BaseTransport | None = None) -> None:
        """`transport` replaces the network, for tests (e.g. `httpx.MockTransport`)."""
        self.settings = settings
        self.traffic = Traffic()
        self.retry = settings.retry_policy()
        """How every call of this client (and of its generation sockets) retries."""
        self._identity: dict[str, Any] | None = None
        self._info: ModelInfo | None = None
        self.auth_headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self.streams = settings.stream_steps
        """Whether generation steps may use a WebSocket; False once a server or proxy refused one."""
        timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        self._extensions = {"timeout": timeout.as_dict()}
        # Requests go straight to the transport, a keep-alive connection pool: httpx.Client's
        # per-request work (URL merging, cookies, hooks, redirects) cost about 1 ms per generation
        # step on 2 cores, more than the step's own HTTP exchange.
        self._transport = transport or httpx.HTTPTransport(
            verify=tls_verify(settings), proxy=env_proxy(settings.base_url)
        )

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> SplitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- JSON endpoints -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", schemas.HEALTH_PATH).json())

    def info(self) -> ModelInfo:
        """The server's model info (cached after the first call)."""
        if self._info is None:
            response = self._request("GET", schemas.INFO_PATH)
            try:
                self._info = ModelInfo.model_validate(response.json())
            except (ValidationError, ValueError) as error:
                raise RemoteError(
                    response.status_code,
                    "bad_info",
                    f"not a splitprefix model info: {error}",
                    self._url(schemas.INFO_PATH),
                ) from None
        return self._info

    def check_compatible(self, manifest: EmulatorManifest) -> ModelInfo:
        """Raise IncompatibleServerError naming every difference between the server and `manifest`.

        On success, forward requests carry the manifest's split point and bottom fingerprint, so
        the server re-checks them on every call.
        """
        info = self.info()
        theirs = {
            "protocol_version": info.protocol_version,
            "num_layers": info.num_layers,
            "split_at (K)": info.split_at,
            "base_config_sha256": info.fingerprints.base_config_sha256,
            "tokenizer_sha256": info.fingerprints.tokenizer_sha256,
            "bottom_sha256": info.fingerprints.bottom_sha256,
        }
        ours = {
            "protocol_version": schemas.PROTOCOL_VERSION,
            "num_layers": manifest.num_layers,
            "split_at (K)": manifest.split_at,
            "base_config_sha256": manifest.base_config_sha256,
            "tokenizer_sha256": manifest.tokenizer_sha256,
            "bottom_sha256": manifest.bottom_sha256,
        }
        diffs = [f"{k}: server {theirs[k]!r} vs emulator {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
        if self.settings.head not in info.head_modes:
            diffs.append(f"head: server offers {info.head_modes}, client asks {self.settings.head!r}")
        diffs += _client_layer_diffs(self.settings.client_layers, info, manifest)
        if self.settings.wire_dtype not in info.wire_dtypes:
            diffs.append(
                f"wire_dtype: server offers {info.wire_dtypes}, client asks {self.settings.wire_dtype!r}"
            )
        if diffs:
            raise IncompatibleServerError(
                f"the server at {self.settings.base_url} does not match the emulator of {manifest.base_model}: "
                + "; ".join(diffs)
                + ". Use the emulator the model party built for this server, or the server for this emulator."
            )
        self._identity = {"split_at": manifest.split_at, "bottom_sha256": manifest.bottom_sha256}
        m = self.settings.client_layers
        if m:
            self._identity |= {"client_layers": m, "top_sha256": manifest.top_sha256[str(m)]}
        return info

    # --- training endpoints ---------------------------------------------------------------------

    def forward(
        self, inputs: dict[str, torch.Tensor], step_id: str, keep_graph: bool
    ) -> tuple[torch.Tensor, bool]:
        """head=client: send forward inputs (see `wire.schemas`); the server's `output` as fp32, and
        whether the server holds the graph for the backward."""
        tensors, reply = self.call(schemas.FORWARD_PATH, inputs, self._training_meta(step_id, keep_graph))
        output = _expect(tensors, schemas.OUTPUT, self._url(schemas.FORWARD_PATH))
        return output, reply.get("graph_held") is True

    def loss(
        self, inputs: dict[str, torch.Tensor], step_id: str, grad: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """head=server: forward inputs plus `targets` (B, T) in, the summed loss () out, with
        `grad_hidden` and `grad_prefix_kv` when `grad`: one round trip per training step."""
        meta = self._training_meta(step_id, False) | {"grad": grad}
        tensors = self._exchange(schemas.LOSS_PATH, inputs, meta)
        url = self._url(schemas.LOSS_PATH)
        names = (schemas.GRAD_HIDDEN, schemas.GRAD_PREFIX) if grad else ()
        return _expect(tensors, schemas.LOSS_SUM, url), {name: _expect(tensors, name, url) for name in names}

    def _training_meta(self, step_id: str, keep_graph: bool) -> dict[str, Any]:
        if self._identity is None:
            raise ConfigError(
                "call check_compatible(manifest) before training: requests carry its fingerprint"
            )
        return self._meta(step_id) | self._identity | {"keep_graph": keep_graph}

    def backward(
        self,
        step_id: str,
        grad_output: torch.Tensor,
        inputs: dict[str, torch.Tensor] | None,
        graph_held: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients (hidden, prefix_kv) for `grad_output`. When the server did not hold the graph
        (`graph_held` false, or a stateless client) the inputs go along at once for a recompute;
        else the server uses its graph, and on `graph_missing` (restart, eviction) we resend."""
        stateless = not (graph_held and self.settings.keep_graph)
        try:
            tensors = self._backward(step_id, grad_output, inputs if stateless else None)
        except RemoteError as error:
            if error.code != schemas.GRAPH_MISSING or inputs is None:
                raise
            self.traffic.recomputes += 1  # the server restarted or evicted the graph
            tensors = self._backward(step_id, grad_output, inputs)
        url = self._url(schemas.BACKWARD_PATH)
        return _expect(tensors, schemas.GRAD_HIDDEN, url), _expect(tensors, schemas.GRAD_PREFIX, url)

    def _backward(
        self, step_id: str, grad_output: torch.Tensor, inputs: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        meta = self._meta(step_id) | (self._identity or {})
        return self._exchange(
            schemas.BACKWARD_PATH, {schemas.GRAD_OUTPUT: grad_output, **(inputs or {})}, meta
        )

    def _meta(self, step_id: str) -> dict[str, Any]:
        s = self.settings
        return {
            "protocol_version": schemas.PROTOCOL_VERSION,
            "step_id": step_id,
            "head": s.head,
            "wire_dtype": s.wire_dtype,
        }

    def _exchange(
        self, path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        return self.call(path, tensors, meta)[0]

    def call(
        self, path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """POST one binary message to `path`; the answer's tensors (floats as fp32) and metadata."""
        dtype = self.settings.wire_dtype
        response = self._request("POST", path, encode(tensors, meta, dtype))
        try:
            out, reply = decode(response.content)
        except WireFormatError as error:
            raise RemoteError(response.status_code, "bad_response", str(error), self._url(path)) from None
        self.traffic.payload_sent += payload_bytes(tensors, dtype)
        self.traffic.payload_received += payload_bytes(out, dtype)  # the server answers in our dtype
        return out, reply

    def delete(self, path: str) -> None:
        """DELETE `path` (with the usual retries); a 4xx answer raises RemoteError."""
        self._request("DELETE", path)

    def request_meta(self, step_id: str, with_identity: bool = True) -> dict[str, Any]:
        """The control fields of a binary request: protocol, step, head, wire dtype [, split and bottom]."""
        if with_identity and self._identity is None:
            raise ConfigError("call check_compatible(manifest) first: requests carry its fingerprint")
        return self._meta(step_id) | ((self._identity or {}) if with_identity else {})

    # --- transport ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, content: bytes | None = None) -> httpx.Response:
        """One call with the client's retry policy; 4xx other than 429 raise RemoteError at once."""
        url = self._url(path)
        headers = {"Content-Type": CONTENT_TYPE} if content is not None else {}

        def attempt() -> httpx.Response:
            self.traffic.requests += 1
            self.traffic.bytes_sent += len(content or b"")
            try:
                response = self._send(method, url, content, headers)
            except httpx.TransportError as error:  # refused, reset, timed out: the server may come back
                raise Transient(f"{type(error).__name__}: {error}") from None
            self.traffic.bytes_received += len(response.content)
            if response.status_code < 400:
                return response
            if response.status_code not in RETRY_STATUSES:
                raise RemoteError(response.status_code, *_error_body(response), url)
            last = "{} {}: {}".format(response.status_code, *_error_body(response))
            raise Transient(last, parse_retry_after(response.headers.get("Retry-After")))

        try:
            return self.retry.call(attempt, self.count_retry)
        except RetriesExhausted as error:
            raise ServerUnreachableError(
                None,
                "unreachable",
                f"{error}. Check that `splitprefix serve` is running and reachable at "
                f"{self.settings.base_url} (host, port, http vs https, firewall), or raise "
                "max_retries / timeout_s if it is overloaded.",
                url,
            ) from None

    def count_retry(self) -> None:
        """Counts a retry in `traffic` (the policy calls it before each wait)."""
        self.traffic.retries += 1

    def _send(self, method: str, url: str, content: bytes | None, headers: dict[str, str]) -> httpx.Response:
        """One HTTP exchange on a pooled keep-alive connection, the answer read whole."""
        request = httpx.Request(
            method, url, content=content, headers=self.auth_headers | headers, extensions=self._extensions
        )
        response = self._transport.handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        return response

    def _url(self, path: str) -> str:
        return self.settings.base_url + path


def tls_verify(settings: ClientSettings) -> bool | ssl.SSLContext:
    """How to check the server's certificate: a CA bundle's context, or on/off."""
    if settings.ca_path is not None:
        return ssl.create_default_context(cafile=str(settings.ca_path))
    return settings.verify_tls


def env_proxy(url: str) -> str | None:
    """The proxy that HTTP_PROXY / HTTPS_PROXY / ALL_PROXY name for `url`, unless NO_PROXY exempts it."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """(code, detail) of an error answer: our ErrorBody, FastAPI's {"detail": ...}, or raw text."""
    return error_fields(response.content, response.reason_phrase)


def error_fields(content: bytes, reason: str) -> tuple[str, str]:
    """(code, detail) of an error body: our ErrorBody, FastAPI's {"detail": ...}, or raw text."""
    try:
        body = json.loads(content)
    except ValueError:
        return "http_error", content[:500].decode(errors="replace") or reason
    if isinstance(body, dict):
        return str(body.get("code", "http_error")), str(body.get("detail", body))
    return "http_error", str(body)


def _expect(tensors: dict[str, torch.Tensor], name: str, url: str) -> torch.Tensor:
    if name not in tensors:
        raise RemoteError(200, "bad_response", f"answer lacks tensor {name!r}; got {sorted(tensors)}", url)
    return tensors[name]
