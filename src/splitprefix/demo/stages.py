"""Running the demo's stages: one clear line per stage, its wall time, and errors that name it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from splitprefix.errors import SplitPrefixError
from splitprefix.interrupts import InterruptFlag


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
    interrupts: InterruptFlag = field(default_factory=InterruptFlag)
    """Ctrl-C was pressed (inside `catching_interrupts`)."""

    @property
    def interrupted(self) -> bool:
        return self.interrupts.raised

    def catching_interrupts(self) -> contextlib.AbstractContextManager[None]:
        """Remember Ctrl-C, so that a stage whose library swallows the KeyboardInterrupt still ends the
        run when it returns."""
        return self.interrupts.watch()

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
