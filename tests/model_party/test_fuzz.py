"""Property-based fuzz over every route of the model party's server and its generation WebSocket.

Each example sends one request, built from a valid one and then mutated (a tensor dropped, added,
reshaped or recast, a metadata field replaced, the body cut short or replaced by noise), with
alice's token, bob's, a wrong one or none, at alice's resources or at unknown ones. Before every
example alice holds a generation session and a forward graph. The properties:

- the server never answers 5xx;
- no one but alice reaches her resources: another token's step, close, socket or backward on them
  is refused, and her session and graph are exactly as they were.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from app_fixtures import ALICE, BOB, step_for
from session_helpers import open_request, step_request
from splitprefix.model_party.app import create_app
from splitprefix.model_party.auth import TokenAuth
from splitprefix.wire import schemas
from splitprefix.wire.tensors import decode
from top_helpers import binary_headers, blob

TOKENS = {"alice": ALICE, "bob": BOB, "wrong": "not-a-token-of-this-server-at-all", "none": None}
NAMES = ["hidden", "attention_mask", "positions", "prefix_kv", "targets", "grad_output", "token_mask", "x"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool]
FILLS = [0.0, 1.0, -1.0, 2.0, float("nan"), float("inf"), 6e4]  # (6e4 fits fp16)
META_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**40),
    st.sampled_from(["server", "client", "fp32", "bf16", "fp8", "", "x" * 300]),
    st.lists(st.integers(0, 3), max_size=3),
)
_EXAMPLES = itertools.count()
ROUTES = [
    "health",
    "info",
    "forward",
    "backward",
    "loss",
    "open",
    "step",
    "close",
    "stream",
    "unknown",
    "wrong-method",
]


@dataclass
class Valid:
    """One valid request body per route, built once: the fuzz mutates copies of them."""

    forward: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]
    grad: dict[str, torch.Tensor]
    open: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]
    step: tuple[dict[str, torch.Tensor], dict[str, Any]]


@pytest.fixture(scope="module")
def fuzzed(model, backend):
    app = create_app(backend, TokenAuth({"alice": ALICE, "bob": BOB}))
    forward = {head: step_for(model, backend, head=head) for head in ("server", "client")}
    valid = Valid(
        forward={head: (s.tensors, s.meta) for head, s in forward.items()},
        grad={schemas.GRAD_OUTPUT: torch.ones(3, 7, backend.dims.hidden_size)},
        open={head: open_request(backend, head=head) for head in ("server", "client")},
        step=step_request(backend),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, backend, app.state.generation, valid


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 5), max_size=5))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(FILLS))
    if dtype.is_floating_point:
        return torch.full(shape, fill, dtype=dtype)
    return (
        torch.full(shape, int(fill) if abs(fill) < 1e9 else 7, dtype=dtype)
        if dtype != torch.bool
        else torch.full(shape, fill == 1.0)
    )


@st.composite
def mutated(draw: st.DrawFn, request: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> bytes:
    """The body of `request` after one random mutation (or none)."""
    named, meta = dict(request[0]), dict(request[1])
    # half the bodies stay valid, so that the routes' success paths are fuzzed too
    kind = draw(
        st.sampled_from(["none"] * 7 + ["drop", "add", "replace", "meta", "drop-meta", "cut", "noise"])
    )
    if kind == "drop" and named:
        named.pop(draw(st.sampled_from(sorted(named))))
    elif kind in ("add", "replace"):
        name = draw(st.sampled_from(NAMES if kind == "add" else sorted(named) or NAMES))
        named[name] = draw(tensors())
    elif kind == "meta":
        meta[draw(st.sampled_from([*sorted(meta), "keep_graph", "max_length", "top_k"]))] = draw(META_VALUES)
    elif kind == "drop-meta" and meta:
        meta.pop(draw(st.sampled_from(sorted(meta))))
    elif kind == "noise":
        return draw(st.binary(max_size=200))
    body = _encode(named, meta)
    return body[: draw(st.integers(0, len(body)))] if kind == "cut" else body


def _encode(named: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    from safetensors.torch import save  # any dtype as it is: the client's encoder would cast

    return save({k: v.contiguous() for k, v in named.items()}, metadata={"splitprefix": json.dumps(meta)})


@dataclass
class AliceHolds:
    """What alice holds before the fuzzed request: a session and a forward graph."""

    session: str
    length: int
    step_id: str


def _prepare_alice(client, generation, valid: Valid, example: int) -> AliceHolds:
    _close_sessions(client, generation)  # (a failed example may have left some)
    tensors_in, meta = valid.open["server"]
    opened = client.post(schemas.SESSIONS_PATH, content=blob(tensors_in, meta), headers=binary_headers(ALICE))
    assert opened.status_code == 200, opened.text
    session = decode(opened.content)[1]["session_id"]
    step_id = f"alice-{example}"
    tensors_in, meta = valid.forward["client"]
    forward = client.post(
        schemas.FORWARD_PATH,
        content=blob(tensors_in, meta | {"step_id": step_id}),
        headers=binary_headers(ALICE),
    )
    assert forward.status_code == 200, forward.text
    return AliceHolds(session, generation.sessions.get("alice", session).length, step_id)


def _send(client, route: str, token: str | None, session: str, body: bytes) -> int:
    """The status of one fuzzed request (for the socket: of the upgrade, or of the first answer)."""
    headers = binary_headers(token)
    paths = {
        "forward": schemas.FORWARD_PATH,
        "backward": schemas.BACKWARD_PATH,
        "loss": schemas.LOSS_PATH,
        "open": schemas.SESSIONS_PATH,
        "step": schemas.SESSION_STEP_PATH.format(session_id=session),
    }
    if route in paths:
        return client.post(paths[route], content=body, headers=headers).status_code
    if route in ("health", "info"):
        path = schemas.HEALTH_PATH if route == "health" else schemas.INFO_PATH
        return client.get(path, headers=headers).status_code
    if route == "close":
        return client.delete(schemas.SESSION_PATH.format(session_id=session), headers=headers).status_code
    if route == "unknown":
        return client.post("/v1/" + session, content=body, headers=headers).status_code
    if route == "wrong-method":
        return client.get(schemas.FORWARD_PATH, headers=headers).status_code
    return _stream(client, token, session, body)


def _stream(client, token: str | None, session: str, body: bytes) -> int:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    path = schemas.SESSION_STREAM_PATH.format(session_id=session)
    try:
        with client.websocket_connect(path, headers=headers) as ws:
            ws.send_bytes(body)
            answer = ws.receive()
    except WebSocketDenialResponse as denied:
        return denied.status_code
    except WebSocketDisconnect as closed:  # no such route, or refused without the denial extension
        return 500 if closed.code == 1011 else 400
    if answer.get("text") is not None:
        return int(json.loads(answer["text"])["status"])
    return 200


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_5xx_and_no_access_across_parties(fuzzed, data):
    # Prepare
    client, backend, generation, valid = fuzzed
    route = data.draw(st.sampled_from(ROUTES), label="route")
    who = data.draw(st.sampled_from(["alice", "bob", "alice", "bob", "wrong", "none"]), label="token")
    head = data.draw(st.sampled_from(["server", "client"]), label="head")
    alice = _prepare_alice(client, generation, valid, next(_EXAMPLES))
    target = data.draw(st.sampled_from([alice.session, alice.session, "0" * 32, "../info"]), label="session")
    request = {
        "forward": valid.forward[head],
        "backward": (valid.grad, valid.forward["client"][1] | {"step_id": alice.step_id}),
        "loss": valid.forward["server"],
        "open": valid.open[head],
    }.get(route, valid.step)
    body = data.draw(mutated(request), label="body")

    try:
        # Execute
        status = _send(client, route, TOKENS[who], target, body)

        # Assert
        event(f"{route} as {who}: {status}")  # (shown by --hypothesis-show-statistics)
        assert status < 500, (route, who, status)
        if who != "alice":
            # refused as if the session did not exist (a malformed body may be refused first)
            if target == alice.session and route in ("step", "close", "stream"):
                assert status in (400, 401, 404, 413, 415, 422), (route, who, status)
            assert generation.sessions.get("alice", alice.session).length == alice.length
            assert backend.graphs.get("alice", alice.step_id) is not None
    finally:
        _release(client, generation, backend, alice)


def _release(client, generation, backend, alice: AliceHolds) -> None:
    """Free alice's session and graph, and bob's sessions, so that the next example has room."""
    _close_sessions(client, generation)
    backend.graphs.discard("alice", alice.step_id)


def _close_sessions(client, generation) -> None:
    for owner, token in (("alice", ALICE), ("bob", BOB)):
        for session in [s for s, held in generation.sessions._sessions.items() if held.owner == owner]:
            client.delete(schemas.SESSION_PATH.format(session_id=session), headers=binary_headers(token))
