"""Ctrl-C for commands whose libraries swallow KeyboardInterrupt (Flower's simulation does)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType


@dataclass
class InterruptFlag:
    """Remembers that Ctrl-C was pressed while `watch` was active, whatever became of the exception."""

    raised: bool = False
    """Ctrl-C arrived inside `watch`."""

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Set `raised` on Ctrl-C, then raise KeyboardInterrupt as usual; the old handler comes back."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def on_interrupt(signum: int, frame: FrameType | None) -> None:
            self.raised = True
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def exit_now(code: int) -> None:
    """Stop Ray if a federation started it, then exit without waiting for Flower's ServerApp thread,
    which would wait for its parties' replies until the round times out."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os._exit(code)
