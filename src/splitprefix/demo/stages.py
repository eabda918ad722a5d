"""Running the demo's stages: one clear line per stage, its wall time, and errors that name it."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

from splitprefix.errors import SplitPrefixError


class DemoStageError(SplitPrefixError):
    """A stage of the demo failed; the message names the stage and what to do."""


@dataclass
class StageClock:
    """Announces each stage, times it, and turns its failure into a `DemoStageError`."""

    total: int
    """Number of stages, for the `[k/total]` counter."""
    echo: Callable[[str], None] = print
    """Where the stage lines go."""
    wall_s: dict[str, float] = field(default_factory=dict)
    """Seconds each finished stage took, by stage name."""
    interrupted: bool = False
    """Ctrl-C was pressed; set by `catching_interrupts`."""

    @contextlib.contextmanager
    def catching_interrupts(self) -> Iterator[None]:
        """Remember Ctrl-C, so that a stage whose library swallows the KeyboardInterrupt (Flower's
        simulation does) still ends the run when it returns."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def on_interrupt(signum: int, frame: FrameType | None) -> None:
            self.interrupted = True
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def stage(self, name: str, what: str, hint: str) -> Iterator[None]:
        """Run the `with` body as stage `name`; on an error, say which stage failed and `hint`."""
        number = len(self.wall_s) + 1
        self.echo(f"[{number}/{self.total}] {name}: {what}")
        start = time.perf_counter()
        try:
            yield
        except (KeyboardInterrupt, DemoStageError):
            raise
        except Exception as error:
            raise DemoStageError(
                f"the demo failed in stage {number}/{self.total} '{name}': "
                f"{type(error).__name__}: {error}\nWhat to do: {hint}"
            ) from error
        if self.interrupted:
            raise KeyboardInterrupt(f"interrupted during stage '{name}'")
        self.wall_s[name] = round(time.perf_counter() - start, 2)
        self.echo(f"[{number}/{self.total}] {name}: done in {self.wall_s[name]:.1f} s")
