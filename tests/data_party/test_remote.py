"""The data party's HTTP client: retries, typed errors, compatibility checks, the autograd bridge."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging

import httpx
import pytest
import torch

from live_server import LiveServer, free_port
from split_helpers import SPLIT_AT, make_dirs, server_settings
from splitprefix.data_party.remote import (
    ClientSettings,
    IncompatibleServerError,
    RemoteError,
    ServerUnreachableError,
    SplitClient,
    env_proxy,
)
from splitprefix.data_party.retry import parse_retry_after
from splitprefix.data_party.session import open_split
from splitprefix.errors import ConfigError
from splitprefix.model.split import token_positions
from splitprefix.model_party.app import create_app
from splitprefix.wire.disclosure import HEAD_DISCLOSURE

FAST = dict(backoff_s=0.001, backoff_max_s=0.01)


def scripted(*answers: httpx.Response | Exception) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that answers requests with `answers` in turn and records what it saw."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), seen


def test_connection_errors_and_503_are_retried_until_an_answer():
    # Prepare
    transport, seen = scripted(
        httpx.ConnectError("refused"), httpx.Response(503), httpx.Response(200, json={"status": "ok"})
    )
    client = SplitClient(ClientSettings("http://model-party:8000", max_retries=3, **FAST), transport)

    # Execute
    health = client.health()

    # Assert
    assert health == {"status": "ok"}
    assert len(seen) == 3 and client.traffic.retries == 2


def test_a_client_mistake_is_not_retried_and_carries_the_servers_detail():
    transport, seen = scripted(
        httpx.Response(422, json={"code": "bad_tensor", "detail": "hidden must have shape (B, T, 64)"})
    )
    client = SplitClient(ClientSettings("http://model-party:8000", **FAST), transport)

    with pytest.raises(RemoteError, match=r"422 \(bad_tensor\): hidden must have shape") as info:
        client.health()

    assert (info.value.status, info.value.code) == (422, "bad_tensor") and len(seen) == 1


def test_retries_are_bounded_and_the_error_says_what_to_check():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = SplitClient(ClientSettings(url, max_retries=2, connect_timeout_s=1, **FAST))

    with pytest.raises(ServerUnreachableError, match="3 attempts failed") as info:
        client.info()

    assert url in str(info.value) and "splitprefix serve" in str(info.value)
    assert client.traffic.requests == 3


def test_429_and_503_wait_as_long_as_retry_after_says_within_the_cap():
    # Prepare: a full server asks for 30 s (capped at 0.5), then 2 s, then gives no hint (backoff)
    transport, seen = scripted(
        httpx.Response(429, headers={"Retry-After": "30"}),
        httpx.Response(503, headers={"Retry-After": "0.25"}),
        httpx.Response(503),
        httpx.Response(200, json={"status": "ok"}),
    )
    client = SplitClient(
        ClientSettings("http://x", max_retries=3, backoff_s=0.001, backoff_max_s=0.5), transport
    )
    waits: list[float] = []
    client.retry = dataclasses.replace(client.retry, sleep=waits.append)

    # Execute
    client.health()

    # Assert
    assert waits == [0.5, 0.25, pytest.approx(0.004)] and client.traffic.retries == 3 and len(seen) == 4


def test_retry_after_reads_seconds_and_http_dates():
    now = 1_000_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(date, now) == pytest.approx(7.0)
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("server_url", "127.0.0.1:8000", "must start with http"),
        ("head", "both", "head must be"),
        ("wire_dtype", "int8", "wire_dtype must be one of"),
        ("max_retries", -1, "max_retries >= 0"),
        ("timeout_s", 0, "timeouts must be > 0"),
        ("token", "two words", "without whitespace"),
    ],
)
def test_bad_settings_are_rejected(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ClientSettings(**{"server_url": "http://x", field: value})


def test_training_calls_need_a_compatibility_check_first():
    client = SplitClient(ClientSettings("http://x"), scripted(httpx.Response(200))[0])
    with pytest.raises(ConfigError, match="check_compatible"):
        client.forward({"hidden": torch.zeros(1, 1, 4)}, "step", keep_graph=True)


# --- against a real server on loopback --------------------------------------------------------------


def forward_inputs(session, batch: int = 2, length: int = 5) -> dict[str, torch.Tensor]:
    """A valid forward request for the session's server, without a prefix."""
    mask = torch.ones(batch, length, dtype=torch.long)
    with torch.no_grad():
        x = session.bottom(torch.randint(3, 50, (batch, length)), mask, token_positions(mask))
    kv = session.empty_kv()[SPLIT_AT:]
    return {"hidden": x.hidden, "attention_mask": mask, "positions": x.positions, "prefix_kv": kv}


def test_a_rejected_request_raises_the_servers_detail_and_the_server_keeps_serving(dirs, server):
    # Prepare
    session = open_split(dirs.emulator, ClientSettings(server.url, head="client"))
    good = forward_inputs(session)
    bad = good | {"hidden": good["hidden"][..., :10]}

    # Execute
    with pytest.raises(RemoteError, match="hidden must have shape") as info:
        session.client.forward(bad, "step-bad", keep_graph=False)
    output, held = session.client.forward(good, "step-good", keep_graph=False)
    session.close()

    # Assert
    assert (info.value.status, info.value.code) == (422, "bad_tensor")
    assert output.shape == good["hidden"].shape and not held and session.client.traffic.retries == 0


def test_a_missing_token_is_refused_and_the_right_one_accepted(dirs, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"clinic": "c" * 24}))
    with LiveServer(create_app(server_settings(dirs, tokens_file=tokens))) as live:
        with pytest.raises(RemoteError, match="401") as info:
            open_split(dirs.emulator, ClientSettings(live.url, head="client"))
        session = open_split(dirs.emulator, ClientSettings(live.url, head="client", token="c" * 24))
        session.close()
    assert info.value.code == "unauthorized"


def test_an_emulator_of_another_model_is_detected(dirs, server, tmp_path):
    other = make_dirs(tmp_path, seed=1)  # same architecture and config, other weights
    with pytest.raises(IncompatibleServerError, match="bottom_sha256: server") as info:
        open_split(other.emulator, ClientSettings(server.url, head="client"))
    assert "split_at" not in str(info.value)


def test_an_emulator_cut_at_another_layer_is_detected(dirs, server, tmp_path):
    other = make_dirs(dirs.full.parent, split_at=1)
    with pytest.raises(IncompatibleServerError, match=r"split_at \(K\): server 2 vs emulator 1"):
        open_split(other.emulator, ClientSettings(server.url, head="client"))


def test_a_head_mode_the_server_does_not_offer_is_detected(dirs):
    live = LiveServer(create_app(server_settings(dirs, head="client"))).start()
    try:
        with pytest.raises(IncompatibleServerError, match=r"head: server offers \['client'\]"):
            open_split(dirs.emulator, ClientSettings(live.url, head="server"))
    finally:
        live.stop()


def test_the_client_takes_its_proxy_from_the_environment_unless_no_proxy_exempts_the_server(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert env_proxy("http://10.0.0.5:8000") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert env_proxy("http://10.0.0.5:8000") == "http://proxy.example:3128"
    monkeypatch.setenv("NO_PROXY", "10.0.0.5")
    assert env_proxy("http://10.0.0.5:8000") is None


@pytest.mark.parametrize("head", ["server", "client"])
def test_a_split_session_logs_what_its_head_mode_reveals(dirs, server, caplog, head):
    with caplog.at_level(logging.WARNING):
        session = open_split(dirs.emulator, ClientSettings(server.url, head=head))
    session.close()
    assert HEAD_DISCLOSURE[head] in caplog.text
