"""Command-line options built from the settings dataclasses (`splitprefix.fields`).

`settings_command` turns each field of the dataclasses a command takes into one option: its name
is the field's in kebab case (`--max-batch-size`), its type and default are the field's, and its
help is the docstring written under the field. The command receives the built dataclasses, so a
field added to a settings class is on the command line at once, checked by its `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import typer
from typer.models import ArgumentInfo

from splitprefix.fields import default_of, field_docs, field_types, has_default, has_source, kebab

F = TypeVar("F", bound=Callable[..., Any])
SCALARS = (bool, int, float, str, Path)
KEYWORD = inspect.Parameter.KEYWORD_ONLY
FIELD_NAME = re.compile(r"`(\w+)`")
"""A name in backquotes in a docstring: shown as the option's flag when it names a field."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the fields of one settings dataclass become a command's options."""

    cls: type
    """The settings dataclass; the command receives an instance of it."""
    exclude: Collection[str] = ()
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
    prefix: str = ""
    """Put before every option name of this group (`distill-` gives `--distill-steps`)."""
    none_unless: Collection[str] = ()
    """When given, the command receives None unless one of these fields is set off its default."""
    as_config: bool = False
    """The command receives the fields set off their defaults as a Flower config (kebab-case keys,
    paths as text) rather than an instance: for settings read back by `from_flower`."""

    def option_fields(self) -> list[dataclasses.Field[Any]]:
        """The fields that become options or arguments of the command."""
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.exclude]

    def flag(self, name: str) -> str:
        """The option's flag(s) of field `name`, e.g. `--max-tokens` or `--keep-graph/--recompute`."""
        return self.flags.get(name, "--" + self.prefix + kebab(name))

    def build(self, values: dict[str, Any]) -> Any:
        """The instance (or Flower config, or None) the command receives for these option values."""
        fields = {f.name: f for f in dataclasses.fields(self.cls)}
        unset = {n: self.defaults.get(n, default_of(fields[n])) for n in self.none_unless}
        if unset and all(values[n] == unset[n] for n in unset):
            return None
        if self.as_config:
            changed = {
                n: v for n, v in values.items() if not has_default(fields[n]) or v != default_of(fields[n])
            }
            return {
                kebab(n): str(v) if isinstance(v, Path) else v for n, v in changed.items() if v is not None
            }
        return self.cls(**values)


@dataclasses.dataclass
class _Param:
    parameter: inspect.Parameter
    targets: list[tuple[str, str]]
    """(group, field) pairs this one option fills."""
    convert: Callable[[Any], Any]


def _plain_type(hint: Any) -> Any:
    """The type without None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return rest[0] if len(rest) == 1 else typing.Union[rest]  # noqa: UP007
    return hint


def _option_type(hint: Any, where: str) -> tuple[Any, Callable[[Any], Any]]:
    """(annotation for typer, converter to the field's value) of a field type."""
    plain = _plain_type(hint)
    origin, args = typing.get_origin(plain), typing.get_args(plain)
    if origin is Literal:  # an Enum of its values: typer checks it against them, in every version
        return _choices(tuple(str(a) for a in args)), _value
    if origin in (typing.Union, types.UnionType) and str in args:  # e.g. `str | Path`: a name or a path
        return str, _same
    one_kind = origin is list or args[1:] in ((), (...,))
    if origin in (list, tuple) and args and args[0] in SCALARS and one_kind:  # a repeated option
        return list.__class_getitem__(args[0]), (tuple if origin is tuple else list)
    if plain in SCALARS:
        return plain, _same
    raise TypeError(
        f"{where} has type {hint!r}, which has no command-line option: give it a plain type "
        "(bool, int, float, str, Path, Literal, X | None, list/tuple of one of them) or exclude it"
    )


@functools.cache
def _choices(values: tuple[str, ...]) -> type[enum.Enum]:
    """One Enum per set of values, so that two fields of the same Literal may share an option."""
    return enum.Enum("Choice_" + "_".join(values), {v: v for v in values}, type=str)  # type: ignore[return-value]


def _same(value: Any) -> Any:
    return value


def _value(member: Any) -> Any:
    return member.value if isinstance(member, enum.Enum) else member


def _with_choices(help_text: str, choices: type[enum.Enum]) -> str:
    words, values = set(re.findall(r"[\w:.-]+", help_text)), [m.value for m in choices]
    if all(v in words for v in values):
        return help_text
    return f"{help_text} One of: {', '.join(values)}."


def _help(spec: Settings, field: dataclasses.Field[Any], flags: Mapping[str, str]) -> str:
    """The field's docstring (or the command's own text), with `field_name` shown as `--flag`."""
    text = spec.helps.get(field.name) or field_docs(spec.cls).get(field.name)
    if not text and not has_source(spec.cls):  # a build without .py files: options without help
        return ""
    if not text:
        raise TypeError(
            f"{spec.cls.__name__}.{field.name} has no docstring: write one under the field, it is the "
            "option's help"
        )
    return FIELD_NAME.sub(lambda m: f"`{flags[m.group(1)]}`" if m.group(1) in flags else m.group(0), text)


def _build_param(
    group: str, spec: Settings, field: dataclasses.Field[Any], flags: Mapping[str, str]
) -> _Param:
    where = f"{spec.cls.__name__}.{field.name}"
    annotation, convert = _option_type(field_types(spec.cls)[field.name], where)
    default = spec.defaults.get(field.name, default_of(field) if has_default(field) else ...)
    if isinstance(default, tuple):
        default = list(default)
    extra: dict[str, Any] = {"help": _help(spec, field, flags)}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        # the choices in words, not as a metavar that would squeeze the help into a narrow column
        extra |= {"metavar": "TEXT", "help": _with_choices(extra["help"], annotation)}
        default = annotation(default) if isinstance(default, str) else default
    if field.name in spec.arguments:
        name = spec.arguments[field.name]
        info: Any = typer.Argument(default, **extra)
    else:
        flag = spec.flag(field.name)
        name = flag.split("/")[0].removeprefix("--").replace("-", "_")
        if annotation is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        info = typer.Option(default, flag, envvar=spec.envvars.get(field.name), **extra)
    if default is None:
        annotation = annotation | None
    parameter = inspect.Parameter(name, KEYWORD, default=info, annotation=annotation)
    return _Param(parameter, [(group, field.name)], convert)


def _generated(groups: Mapping[str, Settings], share: Collection[str]) -> dict[str, _Param]:
    """One option per field; a field named in `share` and found in several groups fills them all."""
    flags = {
        f.name: spec.flag(f.name).split("/")[0]
        for spec in groups.values()
        for f in spec.option_fields()
        if f.name not in spec.arguments
    }
    params: dict[str, _Param] = {}
    for group, spec in groups.items():
        for field in spec.option_fields():
            param = _build_param(group, spec, field, flags)
            name = param.parameter.name
            if name not in params:
                params[name] = param
            elif name in share and params[name].parameter.annotation == param.parameter.annotation:
                params[name].targets += param.targets
            else:
                where = [f"{groups[g].cls.__name__}.{f}" for g, f in (*params[name].targets, *param.targets)]
                raise TypeError(f"option {name} would fill {where}: share it (same type) or rename one")
    return params


def settings_command(
    named: Mapping[str, Settings] | None = None, /, *, share: Collection[str] = (), **more: Settings
) -> Callable[[F], F]:
    """A typer command whose parameters named in the groups (e.g. `settings=Settings(ServerSettings)`)
    are given as options, one per field, and reach the function as built dataclasses.

    A field name in `share` that several groups have is one option filling each (as one Flower key
    is read by both the party's and the run's config); any other clash of names is an error.
    """

    groups = {**(named or {}), **more}

    def wrap(func: F) -> F:
        hints = typing.get_type_hints(func)
        generated = _generated(groups, share)
        # the options stand where the function names its first settings group, arguments first
        parameters: list[inspect.Parameter] = []
        for p in inspect.signature(func).parameters.values():
            if p.name not in groups:
                parameters.append(p.replace(annotation=hints.get(p.name, p.annotation), kind=KEYWORD))
            elif not any(g.parameter in parameters for g in generated.values()):
                parameters += [g.parameter for g in generated.values()]
        parameters.sort(key=lambda p: not isinstance(p.default, ArgumentInfo))
        if len({p.name for p in parameters}) < len(parameters):
            raise TypeError(f"{func.__name__}: a parameter of its own has the name of a settings field")

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {group: {} for group in groups}
            for name, param in generated.items():
                value = kwargs.pop(name)
                for group, field_name in param.targets:
                    values[group][field_name] = None if value is None else param.convert(value)
            return func(**kwargs, **{group: spec.build(values[group]) for group, spec in groups.items()})

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.settings_options = {n: p.targets for n, p in generated.items()}  # type: ignore[attr-defined]
        command.settings_groups = groups  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return wrap
