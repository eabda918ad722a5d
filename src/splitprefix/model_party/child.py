"""`splitprefix serve` as a child process on a free loopback port, for jobs that run both parties.

The server is started with a tokens file, waited for until `/v1/health` answers, and always
stopped (terminate, then kill) when the `with` block ends, whatever happened inside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from splitprefix.errors import SplitPrefixError
from splitprefix.wire.schemas import HEALTH_PATH


class ServerStartError(SplitPrefixError):
    """The child server exited or did not become healthy in time."""


@dataclass(frozen=True)
class ChildServer:
    """A running child server: where it listens and the token that lets a client in."""

    url: str
    """Base URL, e.g. http://127.0.0.1:54321."""
    tokens: dict[str, str]
    """Client name -> the bearer token the server accepts for it (random per start)."""
    pid: int
    """Process id of the server."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_child(
    model: str,
    split_at: int,
    work: Path,
    clients: list[str],
    head: str = "both",
    timeout_s: float = 300.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[ChildServer]:
    """Run `splitprefix serve MODEL --split-at K` in a child process; yield its URL and tokens.

    Each name in `clients` gets a random token. `work` receives the tokens file (mode 600, removed
    when the server stops) and `server.log`, the child's output, which errors quote. `extra_args`
    go to `serve` as they are (e.g. `--device cuda`).
    """
    work.mkdir(parents=True, exist_ok=True)
    port, tokens = free_port(), {name: secrets.token_urlsafe(24) for name in clients}
    tokens_file = work / "server_tokens.json"
    tokens_file.touch(mode=0o600)
    tokens_file.write_text(json.dumps(tokens))
    command = [sys.executable, "-m", "splitprefix.cli.main", "serve", model, "--split-at", str(split_at)]
    command += ["--port", str(port), "--head", head, "--tokens-file", str(tokens_file), *extra_args]
    log = work / "server.log"
    try:
        with child_process(command, log, os.environ.copy()) as process:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, process, timeout_s, log)
            yield ChildServer(url, tokens, process.pid)
    finally:
        tokens_file.unlink(missing_ok=True)  # the tokens die with the server


@contextlib.contextmanager
def child_process(
    command: list[str], log: Path, env: dict[str, str], stop_timeout_s: float = 20.0
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` as a child process writing to `log`, always stopped (terminate, then kill) at the end."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(
                f"the model-party server exited with code {process.returncode}; its log ({log}) ends:\n"
                + log.read_text()[-2000:]
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + HEALTH_PATH, timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise ServerStartError(
        f"the model-party server at {url} was not healthy after {timeout_s}s; see {log}, or raise the timeout"
    )
