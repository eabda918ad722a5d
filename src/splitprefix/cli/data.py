"""`splitprefix make-data`: write the synthetic customer-service task and its per-party splits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splitprefix.errors import SplitPrefixError


def make_data_command(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the JSONL files and summary.json into.")
    ],
    seed: Annotated[int, typer.Option(help="Seed of the task and of the party partition.")] = 0,
    n_train: Annotated[int, typer.Option(help="Number of training examples.")] = 2000,
    n_test: Annotated[
        int, typer.Option(help="Number of held-out test examples (phrasings never seen in training).")
    ] = 400,
    parties: Annotated[int, typer.Option(help="Number of data parties to split train into; 0 for none.")] = 3,
    alpha: Annotated[
        float, typer.Option(help="Dirichlet label skew: small (0.1) = few intents per party, large = IID.")
    ] = 0.5,
    noise: Annotated[float, typer.Option(help="Probability of each kind of noise in a message.")] = 0.3,
    unseen_templates: Annotated[
        float,
        typer.Option(help="Share of each intent's requests held out wholly for the test split (harder)."),
    ] = 0.0,
) -> None:
    """Write train.jsonl, test.jsonl, party-<k>.jsonl and summary.json for the synthetic intent task."""
    from splitprefix.data.synthetic import SyntheticTaskConfig, write_task

    try:
        config = SyntheticTaskConfig(
            n_train=n_train, n_test=n_test, seed=seed, noise=noise, test_template_fraction=unseen_templates
        )
        summary = write_task(out, config, n_parties=parties, alpha=alpha)
    except SplitPrefixError as err:
        raise typer.BadParameter(str(err)) from err
    sizes = ", ".join(str(party["n"]) for party in summary["parties"]) or "none"
    typer.echo(f"wrote {summary['train']['n']} train, {summary['test']['n']} test examples to {out}")
    typer.echo(f"party sizes: {sizes}")
