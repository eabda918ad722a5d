"""The small base model shipped inside the package, selected everywhere by the name `builtin`."""

from __future__ import annotations

from pathlib import Path

BUILTIN_NAME = "builtin"


def builtin_dir() -> Path:
    """The shipped model's directory, or a clear error when this installation lacks it."""
    path = Path(__file__).parent / "weights"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in model is missing from {path}; reinstall splitprefix, or rebuild it with "
            "`splitprefix pretrain --out <dir>` and copy the result there"
        )
    return path
