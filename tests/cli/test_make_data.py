"""`splitprefix make-data`: help text, and a real run into a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from splitprefix.cli.main import app
from splitprefix.data.formats import load_jsonl

runner = CliRunner()


def test_help_lists_the_options() -> None:
    result = runner.invoke(app, ["make-data", "--help"])

    assert result.exit_code == 0
    for option in ("--out", "--seed", "--n-train", "--n-test", "--parties", "--alpha"):
        assert option in result.output


def test_run_writes_splits_party_files_and_summary(tmp_path: Path) -> None:
    args = ["make-data", "--out", str(tmp_path), "--n-train", "120", "--n-test", "30"]

    result = runner.invoke(app, [*args, "--parties", "3", "--alpha", "0.5", "--seed", "1"])

    assert result.exit_code == 0, result.output
    train = load_jsonl(tmp_path / "train.jsonl")
    parties = [load_jsonl(tmp_path / f"party-{k}.jsonl") for k in range(3)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(train) == 120 and len(load_jsonl(tmp_path / "test.jsonl")) == 30
    assert sorted(map(repr, (e for p in parties for e in p))) == sorted(map(repr, train))
    assert [s["n"] for s in summary["parties"]] == [len(p) for p in parties]
    assert sum(summary["parties"][0]["labels"].values()) == len(parties[0])
    assert summary["train"]["n"] == 120 and summary["test"]["n"] == 30


def test_zero_parties_writes_no_party_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["make-data", "--out", str(tmp_path), "--n-train", "20", "--parties", "0"])

    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob("party-*.jsonl"))
    assert json.loads((tmp_path / "summary.json").read_text())["parties"] == []


def test_bad_setting_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["make-data", "--out", str(tmp_path), "--n-train", "20", "--alpha", "0"])

    assert result.exit_code == 2
    assert "alpha is 0.0" in result.output
