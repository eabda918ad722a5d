"""The `splitprefix` command line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import build_tiny_model
from splitprefix.cli.main import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output


def test_info_prints_json(tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["architecture"] == "gpt2"


def test_info_on_a_missing_directory_fails_cleanly(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert "not a model directory" in str(result.exception) + result.output
