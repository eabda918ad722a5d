"""Generation steps over the session's WebSocket, its failures and the fall back to HTTP, on loopback."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from conftest import random_batch
from live_server import LiveServer
from split_helpers import FAST_RETRIES, make_dirs, server_settings
from splitprefix.data_party import steps
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.model.loading import load_causal_lm
from splitprefix.model.prefixed import generate_with_prefix
from splitprefix.model_party.app import create_app
from splitprefix.model_party.limits import RETRY_AFTER_S
from splitprefix.model_party.validation import RequestError

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    dirs = make_dirs(tmp_path_factory.mktemp("llama"))
    ids, mask = random_batch(batch=2, length=5, padding="left")
    expected = generate_with_prefix(load_causal_lm(dirs.full), ids, mask, None, NEW_TOKENS, pad_token_id=0)
    return dirs, (ids, mask), expected


@pytest.fixture
def socket_steps(monkeypatch):
    """Counts the steps that went over a socket."""
    sent: list[int] = []
    original = steps.SocketSteps._step

    def counted(self, tensors, meta):
        sent.append(1)
        return original(self, tensors, meta)

    monkeypatch.setattr(steps.SocketSteps, "_step", counted)
    return sent


def open_model(dirs, url, **settings) -> SplitModel:
    return SplitModel.open(dirs.emulator, ClientSettings(url, **{"head": "client", **settings}))


@pytest.mark.parametrize("stream_steps", [True, False])
def test_steps_go_over_the_socket_unless_turned_off_and_give_the_same_tokens(
    llama, socket_steps, stream_steps
):
    # Prepare
    dirs, (ids, mask), expected = llama
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)

    # Execute
    server = LiveServer(create_app(server_settings(dirs))).start()
    with server, open_model(dirs, server.url, stream_steps=stream_steps) as model:
        generated = model.generate_ids(ids, mask, config)
        traffic = model.client.traffic

    # Assert: the same tokens; every step's bytes are counted either way (info, open, steps, delete)
    assert torch.equal(generated, expected)
    assert len(socket_steps) == (NEW_TOKENS - 1 if stream_steps else 0)
    assert traffic.requests == 2 + NEW_TOKENS - 1 + 1
    assert traffic.payload_sent > 0 and traffic.bytes_sent > traffic.payload_sent


def test_a_socket_dropped_between_steps_is_reopened_and_the_session_carries_on(llama):
    # Prepare
    dirs, (ids, mask), expected = llama
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    server = LiveServer(create_app(server_settings(dirs))).start()
    with server, open_model(dirs, server.url, **FAST_RETRIES) as model:
        # Execute: the server's connections drop after two tokens (the app and its sessions live on)
        tokens = []
        for step, token in enumerate(model.iter_tokens(ids, mask, config)):
            tokens.append(token)
            if step == 1:
                server.restart(downtime_s=0.2)

        # Assert: the socket was reopened on the same session, which was never lost
        assert model.recoveries == 0 and model.client.traffic.retries >= 1
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def test_a_step_whose_answer_does_not_come_is_recovered_by_a_prefill(llama):
    # Prepare: a server whose third step takes longer than the client waits for an answer
    dirs, (ids, mask), expected = llama
    app = create_app(server_settings(dirs))
    generation = app.state.generation
    run_step, calls = generation._prepare, []  # every step, over HTTP or the socket, is prepared here

    def slow_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            time.sleep(1.5)  # the step is run, but its answer comes too late
        return run_step(*args, **kwargs)

    generation._prepare = slow_third
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)

    # Execute
    with LiveServer(app) as server, open_model(dirs, server.url, timeout_s=0.5) as model:
        generated = model.generate_ids(ids, mask, config)

        # Assert: the session whose state was unknown was dropped and a new one opened
        assert model.recoveries == 1
        assert len(generation.sessions) == 0
    assert torch.equal(generated, expected)


def test_a_step_refused_by_a_full_server_waits_its_retry_after_and_is_sent_again(llama):
    # Prepare: a server that answers the second step 503 server_full, as a full scheduler would
    dirs, (ids, mask), expected = llama
    app = create_app(server_settings(dirs))
    generation = app.state.generation
    run_step, calls = generation._prepare, []  # every step, over HTTP or the socket, is prepared here

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RequestError(503, "server_full", "no room for another step now")
        return run_step(*args, **kwargs)

    generation._prepare = full_once
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)

    # Execute
    with LiveServer(app) as server, open_model(dirs, server.url, backoff_s=0.001, backoff_max_s=5) as model:
        waits: list[float] = []
        model.client.retry = dataclasses.replace(model.client.retry, sleep=waits.append)
        generated = model.generate_ids(ids, mask, config)

        # Assert: the client waited the server's Retry-After (1 s), not its own 1 ms backoff
        assert waits == [float(RETRY_AFTER_S)] and model.client.traffic.retries == 1
        assert model.recoveries == 0
    assert torch.equal(generated, expected)


def test_a_server_that_refuses_the_upgrade_gets_the_steps_over_http(llama, socket_steps, caplog):
    dirs, (ids, mask), expected = llama
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    server = LiveServer(create_app(server_settings(dirs)), ws="none").start()
    with server, open_model(dirs, server.url) as model:
        first = model.generate_ids(ids, mask, config)
        again = model.generate_ids(ids, mask, config)
        assert not model.client.streams
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert len(socket_steps) == 1  # tried once, then HTTP for this client
    assert "go over HTTP" in caplog.text
