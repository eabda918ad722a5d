"""Flower's and Ray's messages that say nothing to our users, turned off one by one.

Each entry names why it cannot be avoided at its source; everything else Flower logs still shows,
and the project's own warnings are untouched.
"""

from __future__ import annotations

import logging
import os

FLOWER_NOISE = (
    # in-process simulation: its replacement, `flwr run`, starts a SuperLink daemon and takes ~20 s
    "DEPRECATED FEATURE: The `run_simulation` function is deprecated",
    # every simulation's normal end: Flower stops its Ray actors
    "Manually terminating ClientAppActor",
)
"""Starts of Flower log messages that are dropped."""


class FlowerNoise(logging.Filter):
    """Drops the records of Flower's logger that start with one of `FLOWER_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(FLOWER_NOISE)


def quiet_flower() -> None:
    """Install the filter on Flower's logger, once per process (also in each Ray actor)."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, FlowerNoise) for f in flower.filters):
        flower.addFilter(FlowerNoise())


def quiet_simulation() -> None:
    """Before a simulation: Flower's messages once each, and Ray's future behaviour without its tip.

    Flower's logger has a console handler of its own and also propagates to the root logger, which
    our commands configure, so each of its lines showed twice. Ray warns (FutureWarning) that it
    will stop hiding accelerators from actors asked for no GPU; setting its variable to 0 opts in
    to that behaviour now, which leaves a party's `device` to the party.
    """
    quiet_flower()
    logging.getLogger("flwr").propagate = False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
