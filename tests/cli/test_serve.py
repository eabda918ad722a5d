"""The `serve` command: a thin wrapper that builds the app and hands it to uvicorn."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from splitprefix.cli.main import app
from splitprefix.errors import ConfigError
from top_helpers import save_model_dir

runner = CliRunner()


def test_serve_help_lists_the_options():
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--split-at", "--head", "--tokens-file", "--tls-cert", "--tls-key", "--max-request-bytes"):
        assert option in result.output


def test_serve_runs_uvicorn_with_the_settings(tmp_path, monkeypatch):
    # Prepare
    model_dir = save_model_dir(tmp_path / "model", "gpt2")
    cert, key, tokens = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "tokens.txt"
    for path in (cert, key):
        path.write_text("pem")
    tokens.write_text("alice alice-token-0123456789\n")
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append((app, kwargs)))

    # Execute
    args = ["serve", str(model_dir), "--split-at", "2", "--port", "9123", "--head", "both"]
    args += ["--tokens-file", str(tokens), "--tls-cert", str(cert), "--tls-key", str(key)]
    result = runner.invoke(app, args)

    # Assert
    assert result.exit_code == 0, result.output
    served, kwargs = calls[0]
    assert kwargs | {
        "ssl_certfile": str(kwargs["ssl_certfile"]),
        "ssl_keyfile": str(kwargs["ssl_keyfile"]),
    } == {
        "host": "127.0.0.1",
        "port": 9123,
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "log_level": "info",
        "access_log": False,
        "ws": "websockets-sansio",
        "ws_max_size": served.state.backend.settings.max_request_bytes,
        "limit_concurrency": served.state.backend.settings.max_connections,
    }
    assert served.state.auth.enabled and served.state.backend.settings.head_modes == ["server", "client"]


def test_serve_logs_each_request_only_when_asked(tmp_path, monkeypatch):
    # Prepare
    model_dir = save_model_dir(tmp_path / "model", "gpt2")
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append(kwargs))

    # Execute
    result = runner.invoke(app, ["serve", str(model_dir), "--split-at", "2", "--access-log"])

    # Assert
    assert result.exit_code == 0, result.output
    assert calls[0]["access_log"] is True


def test_serve_sets_torch_threads_when_asked(tmp_path, monkeypatch):
    # Prepare: record the thread settings and the server start, in order (torch is left as it was)
    model_dir = save_model_dir(tmp_path / "model", "gpt2")
    calls: list[tuple] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append(("run",)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))

    # Execute
    asked = runner.invoke(app, ["serve", str(model_dir), "--split-at", "2", "--threads", "3"])
    default = runner.invoke(app, ["serve", str(model_dir), "--split-at", "2"])

    # Assert: set before the server starts when asked, left to torch otherwise
    assert asked.exit_code == 0 and default.exit_code == 0, asked.output + default.output
    assert calls == [("threads", 3), ("run",), ("run",)]


def test_serve_refuses_a_certificate_without_its_key(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("pem")
    result = runner.invoke(app, ["serve", "builtin", "--split-at", "2", "--tls-cert", str(cert)])
    assert isinstance(result.exception, ConfigError)
    assert "give both tls_cert and tls_key" in str(result.exception)


@pytest.mark.parametrize("split_at", ["0", "4"])
def test_serve_refuses_a_split_outside_the_model(tmp_path, split_at):
    model_dir = save_model_dir(tmp_path / "model", "llama")
    result = runner.invoke(app, ["serve", str(model_dir), "--split-at", split_at])
    assert isinstance(result.exception, ConfigError)
    assert "1 <= K < L" in str(result.exception)


def test_serve_refuses_to_listen_beyond_loopback_without_tokens(tmp_path, monkeypatch):
    # Prepare: an operator binds every interface and forgets the tokens file
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append(kwargs))

    # Execute
    result = runner.invoke(app, ["serve", "builtin", "--split-at", "2", "--host", "0.0.0.0"])

    # Assert: nothing listens, and the error says what to do
    assert isinstance(result.exception, ConfigError) and not calls
    for advice in ("without credentials", "--tokens-file", "127.0.0.1", "--insecure"):
        assert advice in str(result.exception)


def test_serve_listens_beyond_loopback_with_tokens_or_when_told_insecure(tmp_path, monkeypatch):
    # Prepare
    model_dir = save_model_dir(tmp_path / "model", "gpt2")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("alice alice-token-0123456789\n")
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append(kwargs))
    base = ["serve", str(model_dir), "--split-at", "2", "--host", "0.0.0.0"]

    # Execute
    with_tokens = runner.invoke(app, [*base, "--tokens-file", str(tokens)])
    insecure = runner.invoke(app, [*base, "--insecure"])

    # Assert
    assert with_tokens.exit_code == 0 and insecure.exit_code == 0, (with_tokens.output, insecure.output)
    assert [kwargs["host"] for kwargs in calls] == ["0.0.0.0", "0.0.0.0"]


def test_serve_exposes_the_per_party_limits(tmp_path, monkeypatch):
    model_dir = save_model_dir(tmp_path / "model", "gpt2")
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.append((app, kwargs)))
    limits = ["--max-requests-per-client", "3", "--max-streams-per-session", "1"]
    limits += ["--max-streams-per-client", "5", "--max-connections", "40"]
    result = runner.invoke(app, ["serve", str(model_dir), "--split-at", "2", *limits])
    assert result.exit_code == 0, result.output
    served, kwargs = calls[0]
    s = served.state.backend.settings
    assert (s.max_requests_per_client, s.max_streams_per_session, s.max_streams_per_client) == (3, 1, 5)
    assert s.max_connections == 40 and kwargs["limit_concurrency"] == 40
