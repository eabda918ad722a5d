"""The settings dataclasses as the one source of every setting's name, type, default and help.

A field `local_steps` is the option `--local-steps` of the command line and the key `local-steps` of
Flower's configs; its help text is the docstring written under it. The command line builds its
options from these (`cli.options`), and Flower's configs are read and written with `to_kebab` and
`from_kebab`, so a field added to a settings dataclass reaches both without a second copy.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Mapping
from typing import Any


def kebab(name: str) -> str:
    """A field's name as an option or config key: `max_batch_size` -> `max-batch-size`."""
    return name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (and its bases), on one line each."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source: a class built at run time
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def has_source(cls: type) -> bool:
    """Whether the source of `cls` can be read (not in a build without .py files)."""
    try:
        inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return True


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of dataclass `cls` (its annotations may be strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def has_default(field: dataclasses.Field[Any]) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def default_of(field: dataclasses.Field[Any]) -> Any:
    """The field's default value (its factory's product); `dataclasses.MISSING` when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def to_kebab(settings: Any, skip_none: bool = True) -> dict[str, Any]:
    """A settings dataclass's fields under kebab-case keys; None (unset) is left out by default."""
    values = {kebab(f.name): getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return {k: v for k, v in values.items() if not (skip_none and v is None)}


def from_kebab(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `cls` found under their kebab-case keys in `config`; "" (unset) is left out."""
    known = {kebab(f.name): f.name for f in dataclasses.fields(cls)}
    return {known[k]: v for k, v in config.items() if k in known and v != ""}


def shared_fields(*classes: type) -> frozenset[str]:
    """The field names every one of `classes` has: one Flower key that each of them reads."""
    names = [{f.name for f in dataclasses.fields(cls)} for cls in classes]
    return frozenset(set.intersection(*names))
