"""The model party's HTTP service: routes translate between HTTP and `TopBackend`, nothing more.

Generation steps may also come over a WebSocket (`model_party.stream`), with the same errors.

Every client mistake is answered with a 4xx and a JSON `ErrorBody {code, detail}` whose detail says
what to do; a bug in the server answers 500 with a generic body, is logged, and the server keeps
serving. Status codes and error codes:

    401 unauthorized          missing or wrong bearer token (with `WWW-Authenticate: Bearer`)
    400 bad_message           the body is not a splitprefix safetensors message
    413 too_large             the body is over `max_request_bytes` (checked before reading it)
    413 limit_exceeded        batch size or P + T over the limits in /v1/info
    415 unsupported_media     the body was sent as another content type (JSON, form, ...)
    422 non_finite            a tensor holds NaN or Inf
    422 see model_party.validation: unsupported_protocol, invalid_meta, head_not_enabled,
        split_mismatch, fingerprint_mismatch, bad_tensor, wrong_route
    422 bad_request           any other bad input the model itself refused
    409 graph_missing         backward without inputs for a step whose graph is not held
    404 session_missing       a generation session that expired, was lost in a restart, or is another
                              party's: open a new one
    429 too_many_sessions     this party holds its share of generation sessions (with Retry-After)
    429 too_many_requests     this party has its share of requests in flight (model_party.limits)
    429 too_many_streams      this party or session holds its share of generation sockets
    503 server_full           the server's session count or KV-cache memory is exhausted (with Retry-After)
    503 (uvicorn, plain text) the server serves `max_connections` at once (`splitprefix serve`)
    500 internal_error        a server bug
"""

from __future__ import annotations

import asyncio
import logging
import threading
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitprefix.exposure import check_exposure
from splitprefix.model_party.admission import Admission
from splitprefix.model_party.auth import TokenAuth, Unauthorized
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.exchange import AsyncHandler, Handler, InternalError, answer, refusal
from splitprefix.model_party.generation import GenerationBackend
from splitprefix.model_party.limits import PartyLimits
from splitprefix.model_party.settings import ServerSettings
from splitprefix.model_party.stream import add_stream_route
from splitprefix.model_party.validation import RequestError
from splitprefix.wire import schemas
from splitprefix.wire.disclosure import disclosures
from splitprefix.wire.tensors import CONTENT_TYPE, WireFormatError

logger = logging.getLogger(__name__)
# A raw byte stream is a fair way to send a blob; a JSON or form body never is.
ACCEPTED_TYPES = (CONTENT_TYPE, "application/octet-stream")
_bearer = HTTPBearer(auto_error=False, description="One token per data party, from the tokens file.")

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody, "description": text}
    for status, text in {
        400: "Not a splitprefix safetensors message (code bad_message).",
        401: "Missing or invalid bearer token (code unauthorized).",
        404: "Unknown, expired or foreign generation session (code session_missing): open a new one.",
        409: "Backward for a step whose graph is not held (code graph_missing): resend it with the inputs.",
        413: "Body over max_request_bytes (too_large), or batch/tokens over the limits (limit_exceeded).",
        415: "Body sent with a content type other than " + CONTENT_TYPE + " (unsupported_media).",
        422: "Metadata or tensors inconsistent with this model; `code` says which check failed.",
        429: "This data party holds its share of generation sessions (too_many_sessions) or of requests "
        "in flight (too_many_requests); retry after Retry-After seconds.",
        503: "The server's generation sessions or their memory are exhausted (server_full).",
    }.items()
}


async def _client_id(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The data party behind the request's bearer token (the HTTPBearer dependency documents it).

    Async because it is cheap: a sync dependency would cost every request a hop through the thread
    pool, which a generation step pays once per token.
    """
    auth: TokenAuth = request.app.state.auth
    return auth.client_id(request.headers.get("authorization"))


Client = Annotated[str, Depends(_client_id)]


def _binary_route(summary: str, request_text: str, response_text: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "response_class": Response,
        "openapi_extra": {
            "requestBody": {"required": True, "description": request_text, "content": {CONTENT_TYPE: _BINARY}}
        },
        "responses": {200: {"description": response_text, "content": {CONTENT_TYPE: _BINARY}}, **_ERRORS},
    }


def create_app(source: ServerSettings | TopBackend, auth: TokenAuth | None = None) -> FastAPI:
    """The FastAPI app serving `source` (settings to load a model from, or a loaded backend)."""
    settings = source.settings if isinstance(source, TopBackend) else source
    auth = auth or TokenAuth.from_file(settings.tokens_file)
    _log_startup_warnings(settings, auth)  # refuses an open bind before the model loads
    backend = source if isinstance(source, TopBackend) else TopBackend(source)
    app = FastAPI(
        title="splitprefix model party",
        version=str(schemas.PROTOCOL_VERSION),
        description="Split prefix-tuning: the top of the model (layers [K, L), norm, head). "
        "Binary bodies are safetensors blobs; see splitprefix.wire.schemas for the tensors.",
    )
    app.state.backend, app.state.auth = backend, auth
    app.state.admission = Admission(backend.shape)
    app.add_middleware(PartyLimits, settings=settings)

    @app.get(schemas.HEALTH_PATH, summary="Liveness: answers without a token.")
    def health() -> dict[str, Any]:
        return {"status": "ok", "protocol_version": schemas.PROTOCOL_VERSION}

    @app.get(schemas.INFO_PATH, response_model=schemas.ModelInfo, responses={401: _ERRORS[401]})
    def info(client: Client) -> schemas.ModelInfo:
        """Sizes, prefix layout, fingerprints, head modes, limits and warnings of this server."""
        return backend.info().model_copy(update={"generation_stream": True})

    forward_doc = _binary_route(
        "Forward of the top for one training step.",
        "Tensors hidden, attention_mask, positions, prefix_kv; metadata protocol_version, step_id, "
        "head (client), wire_dtype, split_at, bottom_sha256 [, keep_graph].",
        "Tensor `output`: (B, T, d) last hidden states; metadata graph_held.",
    )

    @app.post(schemas.FORWARD_PATH, **forward_doc)
    async def forward(request: Request, client: Client) -> Response:
        return await _serve(request, settings.max_request_bytes, backend.forward, client)

    backward_doc = _binary_route(
        "Backward of the top for one training step.",
        "Tensor grad_output (+ every forward input to have the forward recomputed); metadata as forward.",
        "Tensors grad_hidden (B, T, d) and grad_prefix_kv (L - K, 2, n_kv, P, head_dim).",
    )

    @app.post(schemas.BACKWARD_PATH, **backward_doc)
    async def backward(request: Request, client: Client) -> Response:
        return await _serve(request, settings.max_request_bytes, backend.backward, client)

    loss_doc = _binary_route(
        "One head=server training step: the server runs its layers, the head and the loss.",
        "Tensors hidden, attention_mask, positions, prefix_kv, targets (B, T) (-100 where no loss); "
        "metadata as forward [, grad].",
        "Tensors loss_sum () and, unless grad is false, grad_hidden (B, T, d) and grad_prefix_kv; "
        "metadata n_tokens.",
    )

    @app.post(schemas.LOSS_PATH, **loss_doc)
    async def loss(request: Request, client: Client) -> Response:
        return await _serve(request, settings.max_request_bytes, backend.loss, client)

    _add_generation_routes(app, GenerationBackend(backend))
    _add_error_handlers(app)
    return app


def _add_generation_routes(app: FastAPI, generation: GenerationBackend) -> None:
    """Split inference: open a session with a prefill, step it one token at a time, close it."""
    limit = generation.backend.settings.max_request_bytes
    app.state.generation = generation
    open_doc = _binary_route(
        "Open a generation session: seed its cache with the prefix and prefill the prompts.",
        "Tensors hidden (B, T, d), token_mask (B, T), positions (B, T), prefix_kv (L - K, 2, n_kv, P, hd); "
        "metadata as a training forward plus max_length and top_k. Left-pad the prompts.",
        "For each row's last position: logits (B, V), or top_values/top_indices (B, k), or last_hidden "
        "(B, d) with head=client; metadata session_id and length.",
    )

    @app.post(schemas.SESSIONS_PATH, **open_doc)
    async def open_session(request: Request, client: Client) -> Response:
        return await _serve(request, limit, generation.open, client)

    step_doc = _binary_route(
        "One generation step on a session: the new tokens' layer-K hidden states in, the next-token answer out.",
        "Tensors hidden (B, 1, d), token_mask (B, 1), positions (B, 1); metadata protocol_version, step_id, "
        "head, wire_dtype.",
        "As the open answer.",
    )

    @app.post(schemas.SESSION_STEP_PATH, **step_doc)
    async def step_session(session_id: str, request: Request, client: Client) -> Response:
        step, inline = partial(generation.step, session_id), partial(generation.step_async, session_id)
        return await _serve(request, limit, step, client, inline)

    @app.delete(
        schemas.SESSION_PATH, summary="Close a generation session and free its cache.", responses=_ERRORS
    )
    def close_session(session_id: str, client: Client) -> dict[str, Any]:
        return generation.close(session_id, client)

    add_stream_route(app, generation)


async def _serve(
    request: Request, limit: int, handler: Handler, client: str, inline: AsyncHandler | None = None
) -> Response:
    """Read the body and answer it with `handler` (see `exchange.answer`), which stops if the
    client disconnects meanwhile."""
    body = await _read_body(request, limit)
    request.app.state.admission.check(request.scope["route"].path, body)  # before decoding
    gone = threading.Event()
    watcher = asyncio.create_task(_watch_disconnect(request, gone))
    try:
        out = await answer(request.url.path, body, limit, handler, client, inline, gone)
    finally:
        watcher.cancel()
    return Response(out, media_type=CONTENT_TYPE)


async def _watch_disconnect(request: Request, gone: threading.Event, every_s: float = 0.05) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    gone.set()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 before it is read when Content-Length (or the stream) is over `limit`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media not in ACCEPTED_TYPES:
        raise RequestError(
            415,
            "unsupported_media",
            f"send the body as a safetensors blob with Content-Type {CONTENT_TYPE}; got {media!r}",
        )
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise RequestError(400, "bad_message", f"Content-Length must be a byte count; got {declared!r}")
    if declared is not None and int(declared) > limit:
        raise _too_large(f"{declared} bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int) -> RequestError:
    return RequestError(
        413,
        "too_large",
        f"the body is {size}; this server accepts at most {limit} bytes (max_request_bytes in /v1/info). "
        "Send smaller micro-batches.",
    )


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = schemas.ErrorBody(code=code, detail=detail).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def request_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestError | WireFormatError)
        # a full server is a passing state: tell clients when to come back
        retry = {"Retry-After": "1"} if error.status in (429, 503) else None
        return _error(error.status, error.code, str(error), retry)

    async def unauthorized(_: Request, error: Exception) -> JSONResponse:
        return _error(401, "unauthorized", str(error), {"WWW-Authenticate": "Bearer"})

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        detail = f"{error.detail}; the API is documented at /docs (OpenAPI at /openapi.json)"
        return _error(error.status_code, code, detail, getattr(error, "headers", None))

    async def invalid_request(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return _error(422, "invalid_request", f"the request does not match the API: {error.errors()}")

    async def internal(_: Request, error: Exception) -> JSONResponse:
        return _error(*refusal(error))

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(WireFormatError, request_error)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(InternalError, internal)
    app.add_exception_handler(Exception, internal)


def _log_startup_warnings(settings: ServerSettings, auth: TokenAuth) -> None:
    for text in disclosures(settings.head_modes).values():
        logger.warning(text)
    check_exposure(
        settings.host, auth.enabled, settings.insecure, "the model party's server", "--tokens-file"
    )
    if not settings.loopback and settings.tls_cert is None:
        logger.warning(
            "listening on %s without TLS: activations travel in clear; pass --tls-cert/--tls-key",
            settings.host,
        )
