"""The gateway's API key and limits, played by clients that ask too much or have no key.

Every refusal carries OpenAI's error body, so that the official client raises its typed errors."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from held_request import HeldRequest
from live_server import LiveServer
from split_helpers import make_dirs, server_settings
from splitprefix.cli.main import app as cli
from splitprefix.data_party.gateway import create_gateway
from splitprefix.data_party.gateway_settings import API_KEY_ENV, GatewaySettings, read_api_key
from splitprefix.data_party.generate import SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.errors import ConfigError
from splitprefix.model_party.app import create_app

KEY = "gateway-key-0123456789abcdef"
ASK = {"model": "tiny", "prompt": "The", "max_tokens": 2}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """(the SplitModel the gateways serve, the model server's URL), over loopback."""
    dirs = make_dirs(tmp_path_factory.mktemp("models"))
    with LiveServer(create_app(server_settings(dirs))) as server:
        model = SplitModel.open(dirs.emulator, ClientSettings(server.url, head="client"))
        yield model, server.url, dirs
        model.close()


def _gateway(split, **settings):
    return create_gateway(split[0], "tiny", settings=GatewaySettings(**settings))


def _error(response, status, code, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert (error["code"], error["param"]) == (code, param), error
    return error


def test_a_gateway_with_a_key_refuses_clients_without_it(split):
    with TestClient(_gateway(split, api_key=KEY)) as client:
        # Execute
        missing = client.post("/v1/completions", json=ASK)
        wrong = client.post("/v1/completions", json=ASK, headers={"authorization": "Bearer " + KEY + "x"})
        models = client.get("/v1/models")
        health = client.get("/v1/health")
        right = client.post("/v1/completions", json=ASK, headers={"authorization": "Bearer " + KEY})

    # Assert
    _error(missing, 401, "invalid_api_key")
    _error(wrong, 401, "invalid_api_key")
    _error(models, 401, "invalid_api_key")
    assert health.status_code == 200 and right.status_code == 200, right.text


def test_the_official_client_with_the_key_is_served_and_without_it_is_refused(split):
    with LiveServer(_gateway(split, api_key=KEY)) as front:
        good = openai.OpenAI(base_url=front.url + "/v1", api_key=KEY, max_retries=0)
        bad = openai.OpenAI(base_url=front.url + "/v1", api_key="guess", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


@pytest.mark.parametrize(
    ("ask", "code", "param"),
    [
        ({"max_tokens": 65}, "max_tokens_exceeded", "max_tokens"),
        ({"max_completion_tokens": 65}, "max_tokens_exceeded", "max_tokens"),
        ({"prompt": "word " * 40}, "context_length_exceeded", "prompt"),
        ({"prompt": ["a", "b", "c"]}, "too_many_prompts", "prompt"),
        ({"n": 2}, "invalid_value", "n"),
    ],
)
def test_a_request_over_the_limits_is_refused_before_it_reaches_the_model(split, ask, code, param):
    limits = dict(max_tokens_limit=64, max_prompt_tokens=16, max_prompts=2)
    with TestClient(create_gateway(split[0], "tiny", 8, GatewaySettings(**limits))) as client:
        response = client.post("/v1/completions", json=ASK | ask)
    _error(response, 400, code, param)


def test_a_long_conversation_is_refused_like_a_long_prompt(split):
    with TestClient(_gateway(split, max_prompt_tokens=16)) as client:
        messages = [{"role": "user", "content": "word " * 40}]
        response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
    _error(response, 400, "context_length_exceeded", "messages")


def test_an_oversized_body_is_refused_before_it_is_read(split):
    with TestClient(_gateway(split, max_request_bytes=1000)) as client:
        declared = client.post("/v1/completions", json=ASK | {"prompt": "x" * 2000})
        chunked = client.post(
            "/v1/completions",
            content=iter([b'{"prompt": "', b"x" * 2000, b'"}']),
            headers={"content-type": "application/json"},
        )
    _error(declared, 413, "request_too_large")
    _error(chunked, 413, "request_too_large")


def test_requests_beyond_the_concurrency_limit_get_429(split):
    # Prepare: one client holds the gateway's only slot with a request whose body never ends
    with LiveServer(_gateway(split, max_concurrent=1)) as front:
        url = front.url + "/v1/completions"
        held = HeldRequest(front.port, "/v1/completions", {"content-type": "application/json"})
        try:
            # Execute: ask until the held request has reached the gateway
            deadline = time.monotonic() + 10
            while (refused := httpx.post(url, json=ASK, timeout=10)).status_code == 200:
                assert time.monotonic() < deadline, "the held request never counted"
                held.ensure_held()
                time.sleep(0.05)
            client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny", prompt="The", max_tokens=2)
        finally:
            held.close()
        deadline = time.monotonic() + 10  # the slot frees once the gateway sees the client gone
        while (after := httpx.post(url, json=ASK, timeout=10)).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    # Assert
    error = _error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error" and refused.headers["retry-after"] == "1"
    assert after.status_code == 200


def test_the_api_key_comes_from_the_flag_or_a_file_not_both(tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    assert read_api_key(None, key_file) == KEY and read_api_key(KEY, None) == KEY
    with pytest.raises(ConfigError, match="not both"):
        read_api_key(KEY, key_file)


def test_the_gateway_command_refuses_an_open_bind_without_a_key(split, monkeypatch):
    # Prepare
    _, url, dirs = split
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    base = ["gateway", str(dirs.emulator), "--server", url, "--host", "0.0.0.0"]
    runner = CliRunner()

    # Execute
    open_bind = runner.invoke(cli, base)
    insecure = runner.invoke(cli, [*base, "--insecure"])
    keyed = runner.invoke(cli, base, env={API_KEY_ENV: KEY})

    # Assert: refused before it connects; served when told so or given a key (from the environment)
    assert isinstance(open_bind.exception, ConfigError)
    for advice in ("without credentials", "--api-key", API_KEY_ENV, "--insecure"):
        assert advice in str(open_bind.exception)
    assert insecure.exit_code == 0 and keyed.exit_code == 0, (insecure.output, keyed.output)
    with TestClient(calls[1][0]) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
