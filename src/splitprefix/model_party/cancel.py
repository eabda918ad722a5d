"""Requests whose client is gone stop using the model.

The HTTP layer watches each training request's connection while the backend works on it in a
thread; when the client disconnects (killed, timed out), it sets the request's event. The backend
checks the event when it gets the model and before every layer, so that a dead client's request
neither waits for the model nor keeps computing once it has it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_current = threading.local()


class ClientGone(Exception):
    """The client of the request being served disconnected; nobody will read the answer."""


@contextmanager
def cancelled_by(event: threading.Event | None) -> Iterator[None]:
    """Within this block, `check()` in this thread raises ClientGone once `event` is set.

    Blocks nest: the scheduler serves generation steps (no event) inside a training request's
    layers, and that request's event holds again once they are done."""
    outer = current()
    _current.event = event
    try:
        yield
    finally:
        _current.event = outer


def current() -> threading.Event | None:
    """The event of the request this thread serves, if any."""
    return getattr(_current, "event", None)


def check() -> None:
    """Raise ClientGone if the client of this thread's request has gone away."""
    event = current()
    if event is not None and event.is_set():
        raise ClientGone
