"""MkDocs hook: the CLI reference page, rendered from the CLI's own click objects at build time.

The page is never committed, so it cannot go stale: every build reads the commands, arguments,
options, defaults and help texts from `splitprefix.cli.main.app` as click sees them, whatever
code produced them (typer signatures today, settings dataclasses tomorrow).
"""

from __future__ import annotations

from typing import Any

import click

_UNSET = getattr(click.core, "UNSET", None)  # click 8.2+: the default of a parameter given none

PAGE = "reference/cli.md"

INTRO = """# CLI reference

Every `splitprefix` command with its arguments and options. This page is generated from the
command-line interface itself each time the documentation is built, so it matches the installed
code; `splitprefix COMMAND --help` prints the same texts in a terminal.
"""


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell: one line, no column breaks, no raw HTML."""
    flat = " ".join(str(text).split())
    return flat.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _prose(text: str) -> str:
    """A help text as Markdown paragraphs: its own paragraphs kept, no raw HTML."""
    paragraphs = [" ".join(part.split()) for part in text.strip().split("\n\n")]
    return "\n\n".join(p.replace("<", "&lt;").replace(">", "&gt;") for p in paragraphs if p)


def _default(param: click.Parameter) -> str:
    """The default as `--help` would state it, or 'required' / '' when there is none to show."""
    if param.required:
        return "required"
    default = param.default
    if isinstance(param, click.Option) and param.is_flag:
        default = default is True
    if callable(default) or default is None or default == () or default == [] or default is _UNSET:
        return ""
    if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    if isinstance(param, click.Option) and param.is_flag:
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return ", ".join(f"`{_cell(item)}`" for item in default)
    return f"`{_cell(default)}`"


def _names(param: click.Parameter) -> str:
    """`--name / --no-name` for options, the metavar for arguments."""
    if isinstance(param, click.Argument):
        return f"`{param.human_readable_name}`"
    names = " / ".join(f"`{name}`" for name in [*param.opts, *param.secondary_opts])
    return names + (" (repeatable)" if getattr(param, "multiple", False) else "")


def _kind(param: click.Parameter) -> str:
    """The value's type as click names it (none for a flag)."""
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    if isinstance(param.type, click.Choice):
        return " \\| ".join(f"`{choice}`" for choice in param.type.choices)
    return _cell(param.type.name)


def render_command(name: str, command: click.Command, parent: click.Context) -> str:
    """One command's section: its help, its usage line and a table of its parameters."""
    context = click.Context(command, info_name=name, parent=parent)
    usage = " ".join(command.collect_usage_pieces(context))
    lines = [f"## `splitprefix {name}`", "", _prose(command.help or ""), ""]
    lines += ["```text", f"splitprefix {name} {usage}", "```", ""]
    params = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
    if params:
        lines += ["| argument or option | type | default | what it is |", "| --- | --- | --- | --- |"]
        for param in params:
            help_text = _cell(getattr(param, "help", None) or "")
            lines.append(f"| {_names(param)} | {_kind(param)} | {_default(param)} | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def render_cli(group: click.Group) -> str:
    """The whole page: an index of the commands, then one section per command, in the CLI's order."""
    root = click.Context(group, info_name="splitprefix")
    names = list(group.commands)
    index = [
        f"- [`{name}`](#splitprefix-{name}): {_cell(_first_line(group.commands[name]))}" for name in names
    ]
    sections = [render_command(name, group.commands[name], root) for name in names]
    return "\n".join([INTRO, *index, "", *sections])


def _first_line(command: click.Command) -> str:
    return (command.help or "").strip().split("\n\n")[0]


def splitprefix_group() -> click.Group:
    """The `splitprefix` command group as click builds it from the typer app."""
    import typer

    from splitprefix.cli.main import app

    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return group


def on_files(files: Any, config: Any) -> Any:
    """Add the generated page to the site's files (MkDocs calls this before it resolves the nav)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render_cli(splitprefix_group())))
    return files
