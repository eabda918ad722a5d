"""Progress of long work: a bar on a terminal, plain lines in logs.

tqdm draws nothing when stderr is not a terminal (logs, CI, nohup), so a long stage would print
nothing for minutes. There `Progress` writes one line every `every_s` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LOG_EVERY_S = 30.0


class Progress(Generic[T]):
    """Iterate `items`, showing `desc` and the count done out of `total`."""

    def __init__(
        self,
        items: Iterable[T],
        desc: str,
        total: int | None = None,
        initial: int = 0,
        every_s: float = LOG_EVERY_S,
        terminal: bool | None = None,
    ) -> None:
        self.items, self.desc, self.initial, self.every_s = items, desc, initial, every_s
        self.total = total if total is not None else _length(items, initial)
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.postfix: dict[str, str] = {}
        self._bar: tqdm | None = None

    def set_postfix(self, **values: object) -> None:
        """Values shown after the count, e.g. the last loss."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def __iter__(self) -> Iterator[T]:
        if self.terminal:
            self._bar = tqdm(self.items, desc=self.desc, initial=self.initial, total=self.total, leave=False)
            yield from self._bar
            return
        began = last = time.monotonic()
        done = shown = self.initial
        for item in self.items:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.every_s:
                self._line(done, now - began)
                last, shown = now, done
        if done > shown:  # the end, unless its line was just written
            self._line(done, time.monotonic() - began)

    def _line(self, done: int, elapsed: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {done}{of} in {elapsed:.0f} s{extra}", file=sys.stderr, flush=True)


def _length(items: Iterable[object], initial: int) -> int | None:
    try:
        return initial + len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
