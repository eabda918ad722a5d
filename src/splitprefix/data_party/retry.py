"""The one retry policy of the data party's network calls, over HTTP and over the generation socket.

An attempt that fails in a way the server may recover from (refused or reset connection, timeout,
429, 5xx) raises `Transient`; the policy waits and tries again, at most `max_retries` times. The
wait doubles from `backoff_s`, or is the server's `Retry-After` when it sent one, and is capped at
`backoff_max_s` either way, so a server cannot hold a client longer than its settings allow. Every
other error passes through at once. The settings live in `ClientSettings`.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

T = TypeVar("T")


class Transient(Exception):
    """One attempt failed in a way worth retrying; `retry_after` is the server's wait in seconds, if any."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class RetriesExhausted(Exception):
    """Every attempt failed; `attempts` were made and `last` says how the last one did."""

    def __init__(self, attempts: int, last: str) -> None:
        super().__init__(f"{attempts} attempts failed, the last with {last}")
        self.attempts, self.last = attempts, last


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` value: delay-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with capped exponential backoff that honours the server's `Retry-After`."""

    max_retries: int
    """Retries after the first attempt (0 = fail at once)."""
    backoff_s: float
    """Wait before the first retry; it doubles with every retry."""
    backoff_max_s: float
    """Cap on every wait, the server's Retry-After included."""
    sleep: Callable[[float], None] = time.sleep
    """How to wait (tests pass a recorder)."""

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry `retry` (1, 2, ...)."""
        wanted = self.backoff_s * 2 ** (retry - 1) if retry_after is None else retry_after
        return min(wanted, self.backoff_max_s)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = error.retry_after if isinstance(error, Transient) else None
        return self.delay(state.attempt_number, retry_after)

    def call(self, attempt: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        """`attempt()` until it returns or raises something other than `Transient`; RetriesExhausted
        once `max_retries + 1` attempts have failed. `on_retry` runs before every retry (counters)."""
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(Transient),
            sleep=self.sleep,
            before_sleep=(lambda _: on_retry()) if on_retry is not None else None,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except Transient as error:
            raise RetriesExhausted(self.max_retries + 1, error.reason) from None
