"""Per-party limits (requests in flight, generation sockets) and the global connection limit.

Each test plays a data party that tries to hold more than its share of the server."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from app_fixtures import ALICE, BOB, LIMITS
from held_request import HeldRequest
from live_server import LiveServer
from session_helpers import open_session
from splitprefix.model_party.app import create_app
from splitprefix.model_party.auth import TokenAuth
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from top_helpers import SPLIT_AT, assert_error, binary_headers

TIGHT = dict(max_requests_per_client=2, max_streams_per_session=1, max_streams_per_client=2)


@pytest.fixture(scope="module")
def tight(model_dir):
    """A backend whose parties may hold 2 requests, 2 sockets and 1 socket per session."""
    return TopBackend(ServerSettings(model_dir, SPLIT_AT, head="both", **(LIMITS | TIGHT)))


def _app(backend):
    return create_app(backend, TokenAuth({"alice": ALICE, "bob": BOB}))


def _stream(session_id):
    return schemas.SESSION_STREAM_PATH.format(session_id=session_id)


def _bearer(token):
    return {"authorization": f"Bearer {token}"}


def _refused_socket(client, session_id, token):
    """The denial of a socket upgrade; a socket accepted instead is closed and fails the test."""
    try:
        with client.websocket_connect(_stream(session_id), headers=_bearer(token)):
            pass
    except WebSocketDenialResponse as denied:
        return denied
    raise AssertionError(f"a socket on session {session_id} was accepted")


def _hold(port, token, count):
    """`count` forward requests of `token` that hold their slots (see held_request)."""
    return [HeldRequest(port, schemas.FORWARD_PATH, binary_headers(token)) for _ in range(count)]


def _until(url, token, refused, timeout_s=10.0, held=()):
    """GET /v1/info until its status is (or, with refused=False, is no longer) a refusal."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(url + schemas.INFO_PATH, headers=_bearer(token))
        if (response.status_code != 200) == refused:
            return response
        assert time.monotonic() < deadline, f"still {response.status_code} after {timeout_s} s"
        for request in held:
            request.ensure_held()
        time.sleep(0.05)


def _release(held):
    for request in held:
        request.close()


def test_a_party_cannot_hold_more_requests_in_flight_than_its_share(tight):
    # Prepare: alice holds her 2 requests open with uploads that never finish
    with LiveServer(_app(tight)) as server:
        held = _hold(server.port, ALICE, 2)
        try:
            # Execute
            alice = _until(server.url, ALICE, refused=True, held=held)
            bob = httpx.get(server.url + schemas.INFO_PATH, headers=_bearer(BOB))
        finally:
            _release(held)
        after = _until(server.url, ALICE, refused=False)

    # Assert: alice is told to wait, bob is served, and alice is served again once hers are gone
    assert_error(alice, 429, "too_many_requests", "max_requests_per_client = 2")
    assert alice.headers["retry-after"] == "1"
    assert bob.status_code == 200 and after.status_code == 200


def test_a_session_takes_one_socket_and_a_party_two(tight):
    with TestClient(_app(tight)) as client:
        # Prepare
        sessions = [open_session(client, tight)[0] for _ in range(3)]
        with client.websocket_connect(_stream(sessions[0]), headers=_bearer(ALICE)):
            # Execute: a second socket on the same session
            same_session = _refused_socket(client, sessions[0], ALICE)
            with client.websocket_connect(_stream(sessions[1]), headers=_bearer(ALICE)):
                # ... and a third socket for the party
                third = _refused_socket(client, sessions[2], ALICE)
                bobs = open_session(client, tight, token=BOB)[0]
                with client.websocket_connect(_stream(bobs), headers=_bearer(BOB)):
                    pass  # another party is not counted against alice
        # once her sockets are closed she may open them again
        with client.websocket_connect(_stream(sessions[2]), headers=_bearer(ALICE)):
            pass

    # Assert
    assert_error(same_session, 429, "too_many_streams", "max_streams_per_session")
    assert_error(third, 429, "too_many_streams", r"the limit per data party \(2\)")
    assert same_session.headers["retry-after"] == "1"


def test_info_states_the_per_party_limits(tight):
    with TestClient(_app(tight)) as client:
        limits = client.get(schemas.INFO_PATH, headers=_bearer(ALICE)).json()["limits"]
    assert (limits["max_requests_per_client"], limits["max_streams_per_client"]) == (2, 2)
    assert limits["max_streams_per_session"] == 1


def test_the_global_connection_limit_answers_503(tight):
    # Prepare: uvicorn's limit, which `splitprefix serve` sets to max_connections (tests/cli), here 2
    with LiveServer(_app(tight), limit_concurrency=2) as server:
        held = _hold(server.port, BOB, 1)
        try:
            # Execute: alice's own share is free, but the server holds its connections
            answer = _until(server.url, ALICE, refused=True, held=held)
        finally:
            _release(held)

    # Assert
    assert answer.status_code == 503
