"""Generation steps over the WebSocket: the HTTP step's answers and refusals, message by message."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from app_fixtures import ALICE, BOB
from session_helpers import open_request, open_session, post, step_path, step_request
from splitprefix.model_party.app import create_app
from splitprefix.model_party.auth import TokenAuth
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from splitprefix.wire.tensors import decode
from top_helpers import SPLIT_AT, assert_error, blob


@pytest.fixture(scope="module")
def server(model_dir):
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT, head="both", max_tokens=64))
    with TestClient(create_app(backend, TokenAuth({"alice": ALICE, "bob": BOB}))) as client:
        yield client, backend


def stream_path(session_id: str) -> str:
    return schemas.SESSION_STREAM_PATH.format(session_id=session_id)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def refused(ws) -> dict:
    """The error message the server answered with: StreamError JSON in a text message."""
    message = ws.receive()
    assert message.get("text") is not None, message
    return json.loads(message["text"])


def test_info_offers_the_stream(server):
    client, _ = server
    assert client.get(schemas.INFO_PATH, headers=bearer(ALICE)).json()["generation_stream"] is True


def test_a_step_over_the_stream_answers_as_the_http_step(server):
    # Prepare: two sessions with the same prompt
    client, backend = server
    torch.manual_seed(0)
    request = open_request(backend, top_k=4)
    ids = [decode(post(client, schemas.SESSIONS_PATH, request).content)[1]["session_id"] for _ in range(2)]
    steps = [step_request(backend), step_request(backend, position=8)]

    # Execute: the same two steps over HTTP on one session, over the socket on the other
    http = [decode(post(client, step_path(ids[0]), step).content) for step in steps]
    with client.websocket_connect(stream_path(ids[1]), headers=bearer(ALICE)) as ws:
        streamed = []
        for step in steps:
            ws.send_bytes(blob(*step))
            streamed.append(decode(ws.receive_bytes()))

    # Assert
    for (tensors, reply), (expected, expected_reply) in zip(streamed, http, strict=True):
        assert reply["length"] == expected_reply["length"] and reply["session_id"] == ids[1]
        for name, tensor in expected.items():
            torch.testing.assert_close(tensors[name], tensor, atol=0, rtol=0)


@pytest.mark.parametrize("token", [None, "not-a-token-of-this-server"])
def test_the_upgrade_without_a_valid_token_is_refused_with_401(server, token):
    client, backend = server
    session, _, _ = open_session(client, backend)
    headers = bearer(token) if token else {}
    with pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect(stream_path(session), headers=headers).__enter__()
    assert_error(denied.value, 401, "unauthorized", "token")


def test_another_partys_session_is_refused_as_an_unknown_one(server):
    # Prepare
    client, backend = server
    alices, _, _ = open_session(client, backend)

    # Execute
    with pytest.raises(WebSocketDenialResponse) as stolen:
        client.websocket_connect(stream_path(alices), headers=bearer(BOB)).__enter__()
    with pytest.raises(WebSocketDenialResponse) as unknown:
        client.websocket_connect(stream_path("no-such-session"), headers=bearer(BOB)).__enter__()

    # Assert: the same answer as for a session that does not exist, and as the HTTP step's
    assert_error(stolen.value, 404, schemas.SESSION_MISSING, "never yours")
    assert_error(unknown.value, 404, schemas.SESSION_MISSING, "never yours")
    assert_error(
        post(client, step_path(alices), step_request(backend), BOB), 404, schemas.SESSION_MISSING, ""
    )


def test_bad_messages_get_the_http_routes_error_and_the_socket_serves_on(server):
    # Prepare: a garbled body, a step of the wrong shape, and a text message
    client, backend = server
    session, _, _ = open_session(client, backend)
    tensors, meta = step_request(backend)
    wrong_shape = blob({**tensors, "hidden": torch.randn(2, 1, 5)}, meta)
    over_http = post(client, step_path(session), ({**tensors, "hidden": torch.randn(2, 1, 5)}, meta))

    with client.websocket_connect(stream_path(session), headers=bearer(ALICE)) as ws:
        # Execute
        ws.send_bytes(b"not a safetensors blob")
        garbled = refused(ws)
        ws.send_bytes(wrong_shape)
        shape = refused(ws)
        ws.send_text("hello")
        text = refused(ws)
        ws.send_bytes(blob(tensors, meta))
        tensors_back, reply = decode(ws.receive_bytes())

    # Assert: each refusal is the HTTP answer's status, code and detail; then a good step works
    assert (garbled["status"], garbled["code"]) == (400, "bad_message")
    assert shape == {"status": over_http.status_code, **over_http.json()}
    assert shape["code"] == "bad_tensor" and "(B, T, 64)" in shape["detail"]
    assert (text["status"], text["code"]) == (400, "bad_message")
    assert set(tensors_back) == {schemas.TOP_VALUES, schemas.TOP_INDICES} and reply["step_id"] == "1"


def test_a_server_bug_gets_a_generic_500_message_and_the_socket_stays_open(server, monkeypatch):
    client, backend = server
    session, _, _ = open_session(client, backend)
    with client.websocket_connect(stream_path(session), headers=bearer(ALICE)) as ws:
        with monkeypatch.context() as patch:
            patch.setitem(backend.stacks, 0, lambda *a: 1 / 0)
            ws.send_bytes(blob(*step_request(backend)))
            bug = refused(ws)
        ws.send_bytes(blob(*step_request(backend)))
        after = refused(ws)  # the bug closed the session, whose cache may be half extended
    assert bug == {"status": 500, "code": "internal_error", "detail": bug["detail"]}
    assert "ZeroDivision" not in bug["detail"]
    assert after["code"] == schemas.SESSION_MISSING


def test_a_socket_idle_for_the_session_ttl_is_closed_with_4408(model_dir):
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT, head="both", max_tokens=64, session_ttl_s=0.3))
    with TestClient(create_app(backend, TokenAuth({"alice": ALICE}))) as client:
        session, _, _ = open_session(client, backend)
        with client.websocket_connect(stream_path(session), headers=bearer(ALICE)) as ws:
            closed = ws.receive()  # nothing sent: the server gives up after the session's idle time
    assert closed["type"] == "websocket.close" and closed["code"] == schemas.STREAM_IDLE_CLOSE
