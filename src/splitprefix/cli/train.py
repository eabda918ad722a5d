"""`splitprefix train`: the data party refines a full-model prefix through the model party's server."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from splitprefix.cli.options import Settings, settings_command
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.split_train import SplitTrainConfig
from splitprefix.data_party.train import TrainConfig
from splitprefix.runtime import RuntimeSettings

TOKEN_ENV = "SPLITPREFIX_TOKEN"
"""The environment variable every data-party command reads its bearer token from."""

PRIVACY_OPTIONS = Settings(
    PrivacyConfig,
    flags={"clip_norm": "--clip", "noise_multiplier": "--noise", "seed": "--noise-seed"},
    none_unless={"clip_norm", "noise_multiplier"},
)
"""A data party's clipping and noise (None when both are off), as every data-party command takes them."""

TRAIN_OPTIONS = {
    "client": Settings(
        ClientSettings,
        flags={"server_url": "--server", "ca_path": "--ca", "keep_graph": "--keep-graph/--recompute"},
        envvars={"token": TOKEN_ENV},
    ),
    "config": Settings(SplitTrainConfig, exclude={"train", "privacy"}),
    "train": Settings(TrainConfig, helps={"seed": "Seed of the prefix initialisation and the data order."}),
    "privacy": PRIVACY_OPTIONS,
    "runtime": Settings(RuntimeSettings),
}
"""The settings `train` takes, each field an option (old names kept: --server, --ca, --recompute)."""


@settings_command(TRAIN_OPTIONS)
def train_command(
    emulator: Path = typer.Argument(
        ..., help="Emulator directory from the model party (`splitprefix emulate`)."
    ),
    data: Path = typer.Option(..., "--data", help="Training JSONL."),
    out: Path = typer.Option(
        ..., "--out", help="Prefix directory to write; rerunning resumes its checkpoint."
    ),
    *,
    client: ClientSettings,
    config: SplitTrainConfig,
    train: TrainConfig,
    privacy: PrivacyConfig | None,
    runtime: RuntimeSettings,
) -> None:
    """Data party: train a prefix for all L layers through the server; text stays here (see --head for the labels)."""
    from splitprefix.data_party.split_train import train_split

    config = replace(config, train=train, privacy=privacy)
    report = train_split(emulator, client, data, out, config, runtime)
    held_out = {k: v for k, v in report.get("held_out", {}).items() if k != "samples"}
    typer.echo(
        json.dumps({k: v for k, v in report.items() if k != "held_out"} | {"held_out": held_out}, indent=2)
    )
    if "privacy" in report:
        typer.echo(privacy_line(report["privacy"]), err=True)


def privacy_line(spent: dict) -> str:
    """The (epsilon, delta) of a run's sent states, in words."""
    if spent["epsilon"] is None:
        return "epsilon: none (clipping without noise gives no guarantee)"
    return f"epsilon: {spent['epsilon']:.4g} at delta {spent['delta']:g}, for the layer-K states sent"
