"""`splitprefix federate`: a local Flower simulation against a model-party server it starts itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from split_helpers import EXAMPLES, write_jsonl
from splitprefix.cli.main import app
from splitprefix.model.prefix import Prefix

runner = CliRunner()


def test_federate_help_lists_the_options():
    result = runner.invoke(app, ["federate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--data", "--parties", "--model", "--server", "--token", "--rounds", "--secure", "--out"):
        assert option in result.output
    for option in (
        "--strategy",
        "--server-lr",
        "--local-optimizer",
        "--lr-schedule",
        "--keep-optimizer-state",
    ):
        assert option in result.output


def test_federate_starts_a_server_cuts_the_data_and_writes_results_without_noise(dirs, tmp_path):
    # Prepare: one file of 12 examples, cut between 2 parties; the operator's exact match runs
    # generation steps over a WebSocket. A subprocess with Python's default warning filters, as a
    # user runs it, so that third-party deprecation warnings would show on its stderr.
    data, held_out = write_jsonl(tmp_path / "all.jsonl"), write_jsonl(tmp_path / "test.jsonl", EXAMPLES[:4])
    out = tmp_path / "run"
    args = ["federate", str(dirs.emulator), "--data", str(data), "--parties", "2", "--model", str(dirs.full)]
    args += ["--out", str(out), "--eval-data", str(held_out), "--rounds", "2", "--local-steps", "2"]
    args += ["--batch-size", "2", "--prefix-len", "2", "--exact-match"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "splitprefix.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    # Assert: results, rounds, parties' files and a full-layout prefix; the child server is gone
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["parties"] == 2 and r["failed"] == 0 for r in results["rounds"])
    assert results["server"]["started"] and results["bytes_received"] > 0 and results["wall_s"] > 0
    assert sum(p["examples"] for p in results["parties"]) == len(EXAMPLES)
    assert "eval-loss" in results["final"] and "eval-exact_match" in results["final"]
    assert Prefix.load(out / "prefix").config.num_layers == 4
    assert "token" not in json.loads((out / "federation_config.json").read_text())
    assert not (out / "server" / "server_tokens.json").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(results["server"]["url"] + "/v1/health", timeout=2)
    # Assert: no third-party deprecation warning or banner, and no Flower line twice
    assert third_party_noise(done.stderr) == [], done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line and "splitprefix" not in line]
    assert len(warnings) == len(set(warnings)), done.stderr[-3000:]


THIRD_PARTY_WARNING = re.compile(r"^(?P<path>\S+?):\d+: (?P<kind>\w*(Deprecation|Future)Warning)\b", re.M)


def third_party_noise(stderr: str) -> list[str]:
    """Python warnings raised outside our package, and Flower's banners and end-of-run notes."""
    found = [m.group(0) for m in THIRD_PARTY_WARNING.finditer(stderr) if "splitprefix" not in m.group("path")]
    noisy = ("DEPRECATED FEATURE", "fraction_evaluate", "Manually terminating")
    return found + [line for line in stderr.splitlines() if any(n in line for n in noisy)]


def test_the_noise_detector_sees_each_kind_of_noise():
    stderr = (
        "/venv/ray/_private/worker.py:2051: FutureWarning: Tip: ...\n"
        "/src/splitprefix/model/prefix.py:235: FutureWarning: ours, which stays\n"
        "WARNING flwr: DEPRECATED FEATURE: The `run_simulation` function\n"
        "/venv/websockets/sync/client.py:9: DeprecationWarning: connect() must be used as a context manager\n"
    )
    assert len(third_party_noise(stderr)) == 3


def test_federate_needs_exactly_one_model_party(dirs, tmp_path):
    data = write_jsonl(tmp_path / "all.jsonl")
    args = ["federate", str(dirs.emulator), "--data", str(data), "--out", str(tmp_path / "run")]

    result = runner.invoke(app, args)

    assert result.exit_code != 0
    assert "exactly one of model" in str(result.exception)


def test_ctrl_c_swallowed_by_the_simulation_still_ends_federate_with_130(dirs, tmp_path, monkeypatch):
    # Prepare: a simulation that catches the KeyboardInterrupt and returns, as Flower's does
    def swallowing_run(run):
        with contextlib.suppress(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        return {"rounds": []}

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr("splitprefix.federation.local.run_local_federation", swallowing_run)
    monkeypatch.setattr("splitprefix.interrupts.exit_now", exit_now)
    data = write_jsonl(tmp_path / "all.jsonl")
    before = signal.getsignal(signal.SIGINT)

    # Execute
    args = ["federate", str(dirs.emulator), "--data", str(data), "--model", str(dirs.full)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])

    # Assert
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "rerun the same command" in result.output
    assert signal.getsignal(signal.SIGINT) is before
