"""A real uvicorn server on loopback, in a background thread, for integration and fault tests.

    with LiveServer(app) as server:
        httpx.get(server.url + "/v1/health")
        server.stop()          # connections now fail, as if the process died
        server.start()         # same port, same app: the client's retries reach it again
        server.restart(app=create_app(...))  # a fresh app, as after a real crash: held state is gone

The port is chosen once (a free one, or the one given) and kept across restarts, so a client
that holds `server.url` sees the same address after `start()`.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn

HEALTH_PATH = "/v1/health"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """Serves `app` (any ASGI app, e.g. FastAPI) with uvicorn on 127.0.0.1:`port` in a thread."""

    def __init__(
        self,
        app: Any,
        port: int | None = None,
        startup_timeout_s: float = 20.0,
        ws: str = "websockets-sansio",
        **config: Any,
    ) -> None:
        """`ws`: uvicorn's WebSocket protocol, as `splitprefix serve` uses it ("none" refuses upgrades);
        `config`: more `uvicorn.Config` options (e.g. `limit_concurrency`)."""
        self.app = app
        self.ws = ws
        self.config = config
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. http://127.0.0.1:54321."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, app: Any | None = None) -> LiveServer:
        """Start serving (`app` replaces the app first) and return once GET /v1/health answers 200."""
        if self.running:
            return self
        if app is not None:
            self.app = app
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="auto",
            access_log=False,
            ws=self.ws,
            **self.config,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn:{self.port}", daemon=True)
        self._thread.start()
        self._wait_healthy()
        return self

    def stop(self) -> None:
        """Stop serving and wait until the port is closed; open connections are dropped."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=self.startup_timeout_s)
        if self._thread.is_alive():  # a request is stuck: force it
            self._server.force_exit = True
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def restart(self, downtime_s: float = 0.0, app: Any | None = None) -> None:
        """Stop, stay down for `downtime_s`, and start again on the same port (with `app` if given)."""
        self.stop()
        time.sleep(downtime_s)
        self.start(app)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last: str = "no answer"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"uvicorn on port {self.port} exited during startup (port in use?)")
            try:
                response = httpx.get(self.url + HEALTH_PATH, timeout=1.0)
                if response.status_code == 200:
                    return
                last = f"status {response.status_code}"
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server on {self.url} not healthy after {self.startup_timeout_s}s: {last}")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
