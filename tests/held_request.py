"""A request that holds a server's slot: its headers sent, its body never finished.

The raw socket never blocks the test: a server that already answered it (for example 429, because
another request held the slot first) is seen by `ensure_held`, which sends it again.
"""

from __future__ import annotations

import socket


class HeldRequest:
    """POST `path` on 127.0.0.1:`port` with `headers`, declaring a 1000-byte body and sending 1 byte."""

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        self.port, self.path, self.headers = port, path, headers
        self.sock = self._send()

    def _send(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        lines = [f"POST {self.path} HTTP/1.1", "host: test", "content-length: 1000"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"{")
        sock.setblocking(False)
        return sock

    def ensure_held(self) -> None:
        """Send it again if the server already answered it or closed it."""
        try:
            answered = self.sock.recv(1024) != b""
        except BlockingIOError:
            return
        if answered:
            self.sock.close()
        self.sock = self._send()

    def close(self) -> None:
        self.sock.close()
