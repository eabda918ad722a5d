"""The lean install: the server and the CLI import no optional package until a command needs it,
and a missing one is named with the extra that brings it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitprefix.cli.main import app
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.extras import EXTRAS, MissingExtraError, require

OPTIONAL = ("flwr", "ray", "matplotlib", "opacus")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_serve_help_and_the_server_app_import_no_optional_package():
    # Prepare: a fresh interpreter, as a model party with the core install starts
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from splitprefix.cli.main import app\n"
        "assert CliRunner().invoke(app, ['serve', '--help']).exit_code == 0\n"
        "import splitprefix.model_party.app\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))\n"
    )

    # Execute
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_missing_package_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr.simulation", None)  # as if flwr were not installed

    with pytest.raises(MissingExtraError, match=r'pip install "splitprefix\[federation\]"'):
        require("flwr.simulation", "splitprefix federate")


def test_federate_without_flower_says_which_extra_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flwr.simulation", None)
    args = ["federate", "emu", "--data", "a.jsonl", "--model", "builtin", "--out", str(tmp_path)]

    result = CliRunner().invoke(app, args)

    assert isinstance(result.exception, MissingExtraError)
    assert "splitprefix[federation]" in str(result.exception)


def test_noise_without_opacus_fails_before_any_training(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "opacus" else object())

    assert PrivacyConfig(clip_norm=1.0).clip_norm == 1.0  # clipping alone needs no accounting
    with pytest.raises(MissingExtraError, match=r"splitprefix\[privacy\]"):
        PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0)


def test_the_core_install_leaves_the_optional_packages_to_extras_that_dev_pulls():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]

    assert not any(package in core for package in EXTRAS)
    assert set(EXTRAS.values()) <= set(extras)
    assert all(f"{extra}" in extras["dev"][0] for extra in EXTRAS.values())  # `pip install -e ".[dev]"`
