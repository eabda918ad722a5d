"""Command-line options built from the settings dataclasses (`splitprefix.fields`).

`settings_command` turns each field of the dataclasses a command takes into one option: its name
is the field's in kebab case (`--max-batch-size`), its type and default are the field's, and its
help is the docstring under the field. The command itself then receives the built dataclasses, so
a field added to a settings class is on the command line at once, checked by its `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
import typer
from typer.models import ArgumentInfo

from splitprefix.fields import default_of, field_docs, field_types, has_default, kebab

F = TypeVar("F", bound=Callable[..., Any])
SCALARS = (bool, int, float, str, Path)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the fields of one settings dataclass become a command's options."""

    cls: type
    """The settings dataclass; the command receives an instance of it."""
    exclude: frozenset[str] = frozenset()
    """Fields the command sets itself (from other options, or nested settings): no option."""
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Option names other than `--<field-name>`, kept for compatibility (`{"ca_path": "--ca"}`)."""
    arguments: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Fields given as positional arguments, by the argument's name (`{"model_dir": "model"}`)."""
    envvars: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Environment variables an option falls back to (`{"token": "SPLITPREFIX_TOKEN"}`)."""
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Help texts that say more than the field's docstring in this command's terms."""
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Defaults of this command that differ from the dataclass's."""

    def option_fields(self) -> list[dataclasses.Field[Any]]:
        """The fields that become options or arguments of the command."""
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.exclude]


@dataclasses.dataclass
class _Param:
    parameter: inspect.Parameter
    targets: list[tuple[str, str]]  # (group, field) pairs this one option fills
    convert: Callable[[Any], Any]


def _plain_type(hint: Any) -> tuple[Any, bool]:
    """The type without None, and whether None was allowed."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return hint, False


def _option_type(hint: Any, where: str) -> tuple[Any, click.ParamType | None, Callable[[Any], Any]]:
    """(annotation for typer, click type or None, converter to the field's value) of a field type."""
    plain, _ = _plain_type(hint)
    origin, args = typing.get_origin(plain), typing.get_args(plain)
    if origin is Literal:
        return str, click.Choice([str(a) for a in args]), _same
    if origin in (typing.Union, types.UnionType) and str in args:  # e.g. `str | Path`: a name or a path
        return str, None, _same
    if (
        origin in (list, tuple)
        and args
        and args[0] in SCALARS
        and (origin is list or args[1:] in ((), (...,)))
    ):
        return list[args[0]], None, (tuple if origin is tuple else list)  # type: ignore[valid-type]
    if plain in SCALARS:
        return plain, None, _same
    raise TypeError(
        f"{where} has type {hint!r}, which has no command-line option: give it a plain type "
        "(bool, int, float, str, Path, Literal, X | None, list/tuple of one of them) or exclude it"
    )


def _same(value: Any) -> Any:
    return value


FIELD_NAME = re.compile(r"`(\w+)`")
"""A name in backquotes in a docstring, which is an option's flag when it names a field."""


def _flag_of(spec: Settings, name: str) -> str | None:
    """`--flag` of field `name` when it is an option of this command (the docstring's `name`)."""
    if name not in {f.name for f in spec.option_fields()} or name in spec.arguments:
        return None
    return "`" + spec.flags.get(name, "--" + kebab(name)).split("/")[0] + "`"


def _with_choices(help_text: str, choice: click.Choice) -> str:
    words = set(re.findall(r"[\w:.-]+", help_text))
    if all(str(c) in words for c in choice.choices):
        return help_text
    return f"{help_text} One of: {', '.join(map(str, choice.choices))}."


def _build_param(group: str, spec: Settings, field: dataclasses.Field[Any]) -> _Param:
    where = f"{spec.cls.__name__}.{field.name}"
    annotation, click_type, convert = _option_type(field_types(spec.cls)[field.name], where)
    help_text = spec.helps.get(field.name) or field_docs(spec.cls).get(field.name)
    if not help_text:
        raise TypeError(f"{where} has no docstring: write one under the field, it is the option's help")
    help_text = FIELD_NAME.sub(lambda m: _flag_of(spec, m.group(1)) or m.group(0), help_text)
    default = spec.defaults.get(field.name, default_of(field) if has_default(field) else ...)
    if default is not ... and annotation is not bool and isinstance(default, (list, tuple)):
        default = list(default)
    extra: dict[str, Any] = {"help": help_text}
    if isinstance(click_type, click.Choice):
        # the choices in words, not as a metavar that would squeeze the help into a narrow column
        extra |= {"click_type": click_type, "metavar": "TEXT", "help": _with_choices(help_text, click_type)}
    if field.name in spec.arguments:
        name = spec.arguments[field.name]
        info: Any = typer.Argument(default, **extra)
    else:
        name = field.name
        flag = spec.flags.get(field.name, "--" + kebab(field.name))
        if annotation is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        info = typer.Option(default, flag, envvar=spec.envvars.get(field.name), **extra)
    if default is None:
        annotation = annotation | None
    parameter = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
    return _Param(parameter, [(group, field.name)], convert)


def _generated(groups: Mapping[str, Settings]) -> dict[str, _Param]:
    """One option per field name; a name in two groups (a shared Flower key) fills both."""
    params: dict[str, _Param] = {}
    for group, spec in groups.items():
        for field in spec.option_fields():
            param = _build_param(group, spec, field)
            name = param.parameter.name
            if name in params:
                if params[name].parameter.annotation != param.parameter.annotation:
                    raise TypeError(f"option {name} has two types in {list(groups)}: merge or exclude one")
                params[name].targets += param.targets
            else:
                params[name] = param
    return params


def settings_command(**groups: Settings) -> Callable[[F], F]:
    """A typer command whose keyword parameters `groups` (e.g. `settings=Settings(ServerSettings)`)
    are given as options, one per field, and reach the function as built dataclasses."""

    def wrap(func: F) -> F:
        hints = typing.get_type_hints(func)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name not in groups
        ]
        generated = _generated(groups)
        clash = {p.name for p in own} & set(generated)
        if clash:
            raise TypeError(f"{func.__name__}: parameters {sorted(clash)} are also settings fields")

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {group: {} for group in groups}
            for name, param in generated.items():
                value = kwargs.pop(name)
                for group, field_name in param.targets:
                    values[group][field_name] = param.convert(value) if value is not None else None
            built = {group: spec.cls(**values[group]) for group, spec in groups.items()}
            return func(**kwargs, **built)

        # positional arguments first (the fields', then the function's own), then the options likewise
        made = [p.parameter for p in generated.values()]
        parameters = sorted([*made, *own], key=lambda p: not isinstance(p.default, ArgumentInfo))
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters]
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.settings_groups = dict(groups)  # type: ignore[attr-defined]  # read by the tests
        return command  # type: ignore[return-value]

    return wrap
