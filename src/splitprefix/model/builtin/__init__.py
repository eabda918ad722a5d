"""The built-in base model, shipped as package data in `weights/`.

The weights are produced by `splitprefix pretrain` (see `splitprefix.pretraining.recipe`) and copied here;
the name `builtin` selects them wherever a model directory is expected.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_NAME = "builtin"
"""The model name that selects the shipped model."""


def builtin_dir() -> Path:
    """The folder of the shipped model; raises FileNotFoundError if the package was installed without it."""
    path = Path(__file__).resolve().parent / "weights"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in model is missing: {path} has no config.json. Rebuild it with "
            f"`splitprefix pretrain --out <folder>` and copy the folder's files there, or pass a model "
            f"directory instead of '{BUILTIN_NAME}'"
        )
    return path
