"""The optional parts of the install, and the error that names the one to add.

The core install is what the model party's server needs (`splitprefix serve`) plus the data
party's split training and generation. Flower, matplotlib and opacus come with extras, and are
imported only by the commands that use them.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from splitprefix.errors import SplitPrefixError

EXTRAS = {"flwr": "federation", "matplotlib": "demo", "opacus": "privacy"}
"""Top-level package -> the extra of `pip install "splitprefix[EXTRA]"` that brings it."""


class MissingExtraError(SplitPrefixError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` naming the extra to install for `purpose`
    (`extra`, else the one that brings `module`)."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != top:
            raise  # something else is missing inside an installed package
        raise MissingExtraError(_missing(top, purpose, extra)) from None


def check(module: str, purpose: str) -> None:
    """Raise `MissingExtraError` now, without importing it, when `module` is not installed: so a run
    that would need it at its end fails before it starts."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise MissingExtraError(_missing(module.split(".")[0], purpose))


def _missing(top: str, purpose: str, extra: str | None = None) -> str:
    return f'{purpose} needs {top}, which is not installed: pip install "splitprefix[{extra or EXTRAS[top]}]"'
