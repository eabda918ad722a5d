"""The docs site's generated CLI page, the protocol page's routes, and the README's links."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import click
import pytest
from starlette.routing import Route, WebSocketRoute

from splitprefix.model_party.app import create_app

ROOT = Path(__file__).resolve().parents[2]


def _hook():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_page_has_every_command_and_option_as_click_sees_them():
    hook = _hook()
    group = hook.splitprefix_group()
    page = hook.render_cli(group)
    assert len(group.commands) >= 10
    for name, command in group.commands.items():
        assert f"## `splitprefix {name}`" in page
        section = page.split(f"## `splitprefix {name}`")[1].split("\n## ")[0]
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and param.name != "help":
                assert f"`{param.opts[0]}`" in section, (name, param.opts)


def test_the_cli_page_follows_a_change_of_the_cli():
    """Rendered from click's objects, so a new option shows up without anyone editing a page."""
    hook = _hook()
    command = click.Command(
        "toy",
        help="A <toy> command.",
        params=[
            click.Argument(["path"]),
            click.Option(["--rounds"], type=int, default=5, help="Rounds | all of them."),
            click.Option(["--secure/--no-secure"], default=False, help="SecAgg+."),
            click.Option(["--quick"], is_flag=True, help="Small budgets."),
        ],
    )
    page = hook.render_cli(click.Group("splitprefix", commands={"toy": command}))
    assert "A &lt;toy&gt; command." in page
    assert "| `--rounds` | integer | `5` | Rounds \\| all of them. |" in page
    assert "| `--secure` / `--no-secure` | flag | `--no-secure` | SecAgg+. |" in page
    assert "| `--quick` | flag | off | Small budgets. |" in page
    assert "| `PATH` | text | required |" in page


def _documented_routes() -> set[tuple[str, str]]:
    page = (ROOT / "docs" / "reference" / "protocol.md").read_text()
    rows = re.findall(r"^\| (GET|POST|DELETE|WebSocket) \| `([^`]+)` \|", page, re.M)
    return {(method.upper(), path) for method, path in rows}


def test_the_protocol_page_lists_exactly_the_servers_routes(backend):
    served = set()
    for route in create_app(backend).routes:
        if isinstance(route, WebSocketRoute):
            served.add(("WEBSOCKET", route.path))
        elif isinstance(route, Route) and route.path.startswith("/v1/"):
            served |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
    assert served == _documented_routes()


def _slug(heading: str) -> str:
    """The anchor MkDocs gives a heading (its default toc slugify)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text)


README_LINKS = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())


@pytest.mark.parametrize("link", [link for link in README_LINKS if not link.startswith(("http", "#"))])
def test_every_relative_link_of_the_readme_resolves(link):
    path, _, anchor = link.partition("#")
    target = ROOT / path
    assert target.exists(), f"README links to {path}, which does not exist"
    if anchor:
        headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
        assert anchor in {_slug(h) for h in headings}, f"{path} has no heading for #{anchor}"


def _docs_text() -> str:
    pages = sorted((ROOT / "docs").rglob("*.md"))
    return "\n".join(page.read_text() for page in pages)


def test_every_benchmark_command_in_the_docs_names_a_committed_script():
    scripts = set(re.findall(r"(?:python|bash)\s+(benchmarks/[\w/]+\.(?:py|sh))", _docs_text()))
    assert len(scripts) >= 8
    for script in scripts:
        assert (ROOT / script).is_file(), f"the docs run {script}, which is not committed"


@pytest.mark.parametrize(
    "result", sorted((ROOT / "docs" / "benchmarks" / "results").glob("*.json")), ids=lambda path: path.name
)
def test_every_committed_result_is_json_and_linked_from_the_docs(result):
    json.loads(result.read_text())
    assert f"results/{result.name}" in _docs_text(), f"no page links to {result.name}"
