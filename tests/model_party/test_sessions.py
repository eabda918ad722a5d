"""Generation sessions over HTTP: ownership, idle expiry, count and memory limits, bad steps."""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient

from app_fixtures import ALICE, BOB
from session_helpers import BATCH, PREFIX, PROMPT, open_request, open_session, post, step_path, step_request
from splitprefix.model_party.app import create_app
from splitprefix.model_party.auth import TokenAuth
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.sessions import SessionStore
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from splitprefix.wire.tensors import decode
from top_helpers import SPLIT_AT, assert_error, binary_headers

LIMITS = dict(max_sessions=3, max_sessions_per_client=2, max_tokens=64)


@pytest.fixture(scope="module")
def server(model_dir):
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT, head="both", **LIMITS))  # type: ignore[arg-type]
    with TestClient(create_app(backend, TokenAuth({"alice": ALICE, "bob": BOB}))) as client:
        yield client, backend


@pytest.fixture(autouse=True)
def no_sessions(server):
    """The module's tests share one server: close what each test opened."""
    yield
    client, _ = server
    store = client.app.state.generation.sessions
    for owner, session_id in [(s.owner, key) for key, s in store._sessions.items()]:
        store.close(owner, session_id)


def test_open_answers_top_k_logits_or_last_hidden_and_steps_extend_the_cache(server):
    client, backend = server
    session, tensors, reply = open_session(client, backend, top_k=3)
    assert set(tensors) == {schemas.TOP_VALUES, schemas.TOP_INDICES}
    assert tensors[schemas.TOP_INDICES].shape == (BATCH, 3) and reply["length"] == PREFIX + PROMPT
    step = post(client, step_path(session), step_request(backend))
    assert step.status_code == 200, step.text
    assert decode(step.content)[1]["length"] == PREFIX + PROMPT + 1
    _, tensors, _ = open_session(client, backend, head="client")
    assert tensors[schemas.LAST_HIDDEN].shape == (BATCH, backend.dims.hidden_size)


def test_a_session_belongs_to_the_token_that_opened_it(server):
    client, backend = server
    session, _, _ = open_session(client, backend)
    stolen = post(client, step_path(session), step_request(backend), token=BOB)
    assert_error(stolen, 404, schemas.SESSION_MISSING, "open a new session")
    deleted = client.delete(schemas.SESSION_PATH.format(session_id=session), headers=binary_headers(BOB))
    assert_error(deleted, 404, schemas.SESSION_MISSING, "never yours")
    assert post(client, step_path(session), step_request(backend)).status_code == 200


def test_too_many_sessions_answer_429_then_503_and_closing_one_makes_room(server):
    client, backend = server
    first, _, _ = open_session(client, backend)
    open_session(client, backend)
    refused = post(client, schemas.SESSIONS_PATH, open_request(backend))
    assert_error(refused, 429, "too_many_sessions", "limit per data party")
    assert refused.headers["Retry-After"] == "1"
    open_session(client, backend, token=BOB)  # the third and last overall
    full = post(client, schemas.SESSIONS_PATH, open_request(backend), token=BOB)
    assert_error(full, 503, "server_full", "maximum of 3")
    assert (
        client.delete(
            schemas.SESSION_PATH.format(session_id=first), headers=binary_headers(ALICE)
        ).status_code
        == 200
    )
    open_session(client, backend)


def test_a_session_over_the_memory_cap_answers_503(model_dir):
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT, max_session_bytes=50_000))
    with TestClient(create_app(backend, TokenAuth(None))) as client:
        small = post(client, schemas.SESSIONS_PATH, open_request(backend, max_length=PREFIX + PROMPT + 2))
        assert small.status_code == 200, small.text
        big = post(client, schemas.SESSIONS_PATH, open_request(backend, max_length=60), token=None)
        assert_error(big, 503, "server_full", "needs .* bytes of KV cache")


def test_steps_past_max_length_or_with_another_batch_are_refused_and_the_server_serves_on(server):
    client, backend = server
    session, _, _ = open_session(client, backend, max_length=PREFIX + PROMPT + 1)
    assert_error(
        post(client, step_path(session), step_request(backend, batch=1)), 422, "bad_tensor", "holds 2 rows"
    )
    assert post(client, step_path(session), step_request(backend)).status_code == 200
    again = step_request(backend, step_id="2")
    assert_error(post(client, step_path(session), again), 413, "limit_exceeded", "max_length")
    short = post(client, schemas.SESSIONS_PATH, open_request(backend, max_length=2))
    assert_error(short, 422, "invalid_meta", "max_length")
    open_session(client, backend)


def test_a_retried_step_gets_its_first_answer_and_extends_the_cache_once(server):
    client, backend = server
    session, _, _ = open_session(client, backend, top_k=4)
    step = step_request(backend)

    first = post(client, step_path(session), step)
    retried = post(client, step_path(session), step)  # as if the first answer had been lost
    following = post(
        client, step_path(session), step_request(backend, position=PREFIX + PROMPT + 1, step_id="2")
    )

    (first_tensors, first_meta), (retried_tensors, retried_meta) = (
        decode(first.content),
        decode(retried.content),
    )
    assert first_tensors.keys() == retried_tensors.keys()
    for name, tensor in first_tensors.items():
        assert torch.equal(tensor, retried_tensors[name])
    first_meta.pop("queue_ms"), retried_meta.pop("queue_ms")  # each request's own wait
    assert first_meta == retried_meta
    assert decode(retried.content)[1]["length"] == PREFIX + PROMPT + 1
    assert decode(following.content)[1]["length"] == PREFIX + PROMPT + 2


def test_idle_sessions_expire():
    now = [0.0]
    store = SessionStore(ttl_s=10, max_sessions=4, max_per_client=4, max_bytes=1000, clock=lambda: now[0])
    from splitprefix.model_party.sessions import Session

    session = store.add(Session("alice", "server", 1, None, torch.ones(1, 3), 8, 100))  # type: ignore[arg-type]
    now[0] = 9.0
    assert store.get("alice", session.session_id) is session  # a use restarts the idle clock
    now[0] = 18.0
    assert len(store) == 1
    now[0] = 19.5
    assert len(store) == 0 and store.expired == 1 and store.reserved_bytes == 0


def test_a_step_may_send_hidden_states_alone_and_gets_the_same_answer(server):
    # Prepare: two sessions with the same prompt
    client, backend = server
    torch.manual_seed(0)
    request = open_request(backend, top_k=4)
    first = post(client, schemas.SESSIONS_PATH, request)
    second = post(client, schemas.SESSIONS_PATH, request)
    ids = [decode(r.content)[1]["session_id"] for r in (first, second)]
    explicit = step_request(backend)

    # Execute: the same step, with its mask and positions, and without them
    full = post(client, step_path(ids[0]), explicit)
    alone = post(client, step_path(ids[1]), ({"hidden": explicit[0]["hidden"]}, explicit[1]))

    # Assert
    assert full.status_code == alone.status_code == 200, alone.text
    for name, tensor in decode(full.content)[0].items():
        torch.testing.assert_close(decode(alone.content)[0][name], tensor, atol=0, rtol=0)


def test_a_step_that_finds_the_model_busy_waits_off_the_event_loop_and_answers_the_same(server):
    # Prepare: two sessions with the same prompt, and the model held by another request
    client, backend = server
    torch.manual_seed(0)
    request = open_request(backend, top_k=4)
    ids = [decode(post(client, schemas.SESSIONS_PATH, request).content)[1]["session_id"] for _ in range(2)]
    step = step_request(backend)
    free = post(client, step_path(ids[0]), step)
    answers, health = [], []

    # Execute: a step while the model is busy; the server meanwhile still answers other requests
    with backend._lock:
        waiting = threading.Thread(target=lambda: answers.append(post(client, step_path(ids[1]), step)))
        waiting.start()
        waiting.join(timeout=0.3)  # the step has arrived and waits for the model
        checking = threading.Thread(target=lambda: health.append(client.get(schemas.HEALTH_PATH)))
        checking.start()
        checking.join(timeout=10)
        assert waiting.is_alive() and not answers
        assert health and health[0].status_code == 200  # the event loop was not blocked by the wait
    waiting.join(timeout=30)

    # Assert
    assert free.status_code == answers[0].status_code == 200, answers[0].text
    for name, tensor in decode(free.content)[0].items():
        torch.testing.assert_close(decode(answers[0].content)[0][name], tensor, atol=0, rtol=0)
