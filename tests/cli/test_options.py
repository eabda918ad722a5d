"""Options built from the settings dataclasses: one option per field, each with its docstring as help,
and the same names as Flower's config keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import pytest
import typer
from typer.testing import CliRunner

from splitprefix.cli.main import app
from splitprefix.cli.options import Settings, settings_command
from splitprefix.federation.config import FederationConfig, PartyConfig
from splitprefix.fields import field_docs, kebab, to_kebab

runner = CliRunner()
GENERATED = (
    "serve",
    "train",
    "federate",
    "emulate",
    "train-offsite",
    "generate",
    "gateway",
    "eval",
    "privacy-audit",
)


def click_command(name: str):
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", GENERATED)
def test_every_settings_field_has_exactly_one_option_with_help(name):
    # Prepare
    command = click_command(name)
    options = command.callback.settings_options
    params = {p.name: p for p in command.params}

    # Execute: the fields each option fills, against the fields of each group
    filled = [target for targets in options.values() for target in targets]
    groups = command.callback.settings_groups
    expected = [(g, f.name) for g, spec in groups.items() for f in spec.option_fields()]

    # Assert
    assert sorted(filled) == sorted(expected) and len(filled) == len(set(filled))
    for option in options:  # typer 0.20 with click 8.5 drops every argument's help: options only
        assert isinstance(params[option], click.Argument) or params[option].help, f"{name} {option}: no help"


def test_every_field_docstring_is_the_help_of_its_serve_option():
    from splitprefix.model_party.settings import ServerSettings

    params = {p.name: p for p in click_command("serve").params}
    for field in dataclasses.fields(ServerSettings)[1:]:  # model_dir is the argument MODEL
        name = field.name
        # up to the first `name`, which the help shows as `--flag`
        assert params[name].help.startswith(field_docs(ServerSettings)[field.name].split("`")[0])


@pytest.mark.parametrize("cls", [PartyConfig, FederationConfig])
def test_every_field_has_exactly_one_flower_key(cls):
    keys = [kebab(f.name) for f in dataclasses.fields(cls)]
    assert len(keys) == len(set(keys)) and all("_" not in k for k in keys)
    assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_party_config_round_trips_through_its_flower_keys():
    party = PartyConfig(
        "emu", "http://127.0.0.1:1", "d.jsonl", head="client", client_layers=1, token="t0ken", clip_norm=2.0,
        noise_multiplier=0.5, noise_seed=3, local_steps=4, local_epochs=1.5, batch_size=3, lr=0.2,
        warmup_steps=1, max_length=64, seed=7, device="cpu", dtype="bf16", optimizer="sgd",
        keep_optimizer_state=True, lr_schedule="run", num_rounds=3,
    )  # fmt: skip
    assert all(
        getattr(party, f.name) != f.default
        for f in dataclasses.fields(party)
        if f.name not in ("head", "device")
    )

    assert PartyConfig.from_flower({}, to_kebab(party)) == party


def test_federation_config_round_trips_through_its_flower_keys():
    federation = FederationConfig(
        "emu", "http://127.0.0.1:1", "out", num_rounds=5, min_parties=3, min_replies=2, prefix_len=4,
        init="p", eval_data="e.jsonl", exact_match=True, max_length=64, head="server", token="t0ken",
        round_timeout_s=9.0, seed=2, secure=True, secagg_max_weight=50.0, secagg_clipping_range=4.0,
        secagg_threshold=0.9, local_steps=3, batch_size=2, local_epochs=1.0, max_examples=40,
        strategy="fedadam", server_lr=0.5, server_momentum=0.5, server_tau=0.01,
    )  # fmt: skip
    assert all(getattr(federation, f.name) != f.default for f in dataclasses.fields(federation))
    operator = {"emulator-dir", "server-url", "token", "head"}
    keys = {("operator-" + k if k in operator else k): v for k, v in to_kebab(federation).items()}

    assert FederationConfig.from_flower(keys) == federation


def test_federate_options_reach_both_apps_as_flower_keys(tmp_path, monkeypatch):
    # Prepare: options off their defaults, of the party's, the run's and both configs
    seen = []
    monkeypatch.setattr(
        "splitprefix.federation.local.run_local_federation", lambda run: seen.append(run) or {}
    )
    args = ["federate", "emu", "--data", "a.jsonl", "--data", "b.jsonl", "--model", "builtin", "--out", "o"]
    args += ["--rounds", "4", "--clip", "1.5", "--noise", "0.5", "--warmup-steps", "2", "--local-steps", "3"]
    args += ["--secagg-threshold", "0.8", "--head", "server", "--secure"]

    # Execute
    result = runner.invoke(app, args)

    # Assert: the keys are the fields' own names, and each app's config reads them back
    assert result.exit_code == 0, result.output
    run = seen[0]
    assert run.data_files == ("a.jsonl", "b.jsonl") and run.model == "builtin" and run.out_dir == "o"
    party = PartyConfig.from_flower(
        {}, {}, {"emulator-dir": "e", "server-url": "http://h", "data-file": "d", **run.flower}
    )
    assert (party.clip_norm, party.noise_multiplier, party.warmup_steps, party.local_steps) == (
        1.5,
        0.5,
        2,
        3,
    )
    assert party.head == "server"
    shared = {k: v for k, v in run.flower.items() if k not in ("head", "clip-norm", "noise-multiplier")}
    federation = FederationConfig.from_flower(
        {"operator-emulator-dir": "e", "operator-server-url": "http://h", "out-dir": "o", **shared}
    )
    assert (federation.num_rounds, federation.secagg_threshold, federation.secure) == (4, 0.8, True)
    assert "seed" not in run.flower  # defaults are left to the dataclasses


def test_train_keeps_its_old_option_names():
    output = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for old in (
        "--server",
        "--ca",
        "--recompute",
        "--clip",
        "--noise",
        "--noise-seed",
        "--device",
        "--dtype",
    ):
        assert old in output


@dataclass
class Toy:
    """A settings class for the generator's own tests."""

    name: str
    """A required name."""
    mode: Literal["a", "b"] = "a"
    """The mode."""
    path: Path | None = None
    """An optional path."""
    flag: bool = False
    """A switch."""
    tags: tuple[str, ...] = ()
    """Repeatable."""


def test_a_generated_command_builds_the_dataclass_and_checks_choices():
    # Prepare
    got = []
    toy = typer.Typer()

    @toy.command()
    @settings_command(toy=Settings(Toy, arguments={"name": "name"}))
    def run(*, toy: Toy) -> None:
        got.append(toy)

    # Execute
    ok = runner.invoke(toy, ["n", "--mode", "b", "--path", "p", "--flag", "--tags", "x", "--tags", "y"])
    bad = runner.invoke(toy, ["n", "--mode", "c"])

    # Assert
    assert ok.exit_code == 0, ok.output
    assert got == [Toy("n", "b", Path("p"), True, ("x", "y"))]
    assert bad.exit_code == 2 and "'c' is not one of" in bad.output


@dataclass
class Bare:
    """A settings class whose field has no docstring."""

    x: int = 0


def test_a_field_without_docstring_or_with_a_clashing_name_is_refused():
    with pytest.raises(TypeError, match="no docstring"):
        settings_command(b=Settings(Bare))(lambda *, b: None)
    with pytest.raises(TypeError, match="would fill"):
        settings_command(a=Settings(Toy), b=Settings(Toy))(lambda *, a, b: None)
