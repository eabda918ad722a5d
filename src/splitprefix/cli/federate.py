"""`splitprefix federate`: a whole federation of data parties on this machine (Flower simulation)."""

from __future__ import annotations

import json
from dataclasses import replace

import typer

from splitprefix.cli.options import Settings, settings_command
from splitprefix.cli.train import TOKEN_ENV
from splitprefix.federation.config import FederationConfig, FlowerConfig, PartyConfig
from splitprefix.federation.local_settings import LocalFederation
from splitprefix.fields import shared_fields

CONNECTION = ("emulator_dir", "server_url", "data_file", "token")
"""Fields of the parties' and the run's configs that the local run sets itself."""


FEDERATE_OPTIONS = {
    "run": Settings(
        LocalFederation,
        exclude={"flower"},
        arguments={"emulator_dir": "emulator"},
        flags={"data_files": "--data", "out_dir": "--out", "server_url": "--server"},
        envvars={"token": TOKEN_ENV},
    ),
    "party": Settings(
        PartyConfig,
        exclude=set(CONNECTION),
        flags={"clip_norm": "--clip", "noise_multiplier": "--noise", "optimizer": "--local-optimizer"},
        helps={"seed": "Seed of the prefix, the data order (round r: seed + r) and the cut."},
        as_config=True,
    ),
    "federation": Settings(
        FederationConfig,
        exclude={*CONNECTION, "out_dir", "min_parties"},
        flags={"num_rounds": "--rounds"},
        as_config=True,
    ),
}
"""`federate`'s settings: where the parties and the model party come from, and the Flower config
that both apps read, every key of a party's and of the run's config an option (--rounds is
num-rounds, --clip clip-norm, --noise noise-multiplier)."""


@settings_command(FEDERATE_OPTIONS, share=shared_fields(PartyConfig, FederationConfig))
def federate_command(*, run: LocalFederation, party: FlowerConfig, federation: FlowerConfig) -> None:
    """Run N data parties against one model party locally, as a Flower simulation; write results.json."""
    import logging

    from splitprefix import interrupts
    from splitprefix.extras import require

    require("flwr.simulation", "splitprefix federate")
    from splitprefix.federation.local import run_local_federation

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("splitprefix.federation", "splitprefix.federation.server_app"):
        logging.getLogger(name).setLevel(logging.INFO)  # one progress line per round
    run = replace(run, flower={**party, **federation})
    out = run.out_dir
    flag = interrupts.InterruptFlag()
    try:
        with flag.watch():
            results = run_local_federation(run)
    except (KeyboardInterrupt, Exception):
        if not flag.raised:
            raise
    if flag.raised:  # Flower's simulation swallows Ctrl-C: its run may even have returned
        typer.echo(
            f"interrupted; the rounds finished so far are saved in {out}: rerun the same command to go on "
            "after the last of them",
            err=True,
        )
        interrupts.exit_now(130)
    summary = {k: v for k, v in results.items() if k != "rounds"}
    typer.echo(json.dumps(summary, indent=2))
