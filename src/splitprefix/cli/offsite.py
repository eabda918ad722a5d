"""The offsite commands: `emulate` (model party), `train-offsite` and `integrate` (data party)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

import typer

from splitprefix.cli.options import Settings, settings_command
from splitprefix.data_party.offsite import OffsiteConfig
from splitprefix.data_party.train import TrainConfig
from splitprefix.model_party.compress import DistillConfig
from splitprefix.runtime import RuntimeSettings


@settings_command(distill=Settings(DistillConfig, prefix="distill-"))
def emulate_command(
    model: str = typer.Argument(..., help="Full model directory, or 'builtin'."),
    split_at: int = typer.Option(..., "--split-at", help="K: the data party runs layers [0, K)."),
    keep: int = typer.Option(
        ..., "--keep", help="N: upper layers kept by uniform layer drop (1 <= N < L - K)."
    ),
    out: Path = typer.Option(..., "--out", help="Emulator directory to write."),
    distill_data: Path | None = typer.Option(
        None,
        "--distill",
        help="JSONL general corpus: distil the kept layers on it (default for 'builtin': the corpus "
        "it was pretrained on; for other models: no distillation).",
    ),
    no_distill: bool = typer.Option(False, "--no-distill", help="Plain layer drop, no distillation."),
    client_layers: int = typer.Option(
        0,
        "--client-layers",
        help="M: ship the full model's last M layers exactly (of the N kept; never distilled), so that "
        "data parties may keep them (the U-shaped split, which hides the labels' gradient).",
    ),
    *,
    distill: DistillConfig,
) -> None:
    """Model party: build the emulator (bit-identical bottom K layers, N kept upper layers) and its manifest."""
    from splitprefix.model.builtin import BUILTIN_NAME
    from splitprefix.model_party.compress import PRETRAINING_CORPUS, emulate

    corpus: Path | str | None = distill_data
    if no_distill:
        corpus = None
    elif corpus is None and model == BUILTIN_NAME:
        corpus = PRETRAINING_CORPUS
    manifest = emulate(model, split_at, keep, out, corpus, distill, client_layers)
    typer.echo(f"emulator written to {out}: kept layers {manifest.kept_layers} of L={manifest.num_layers}")
    if manifest.distillation:
        d = manifest.distillation
        typer.echo(
            f"perplexity full {d['full_perplexity']:.2f}; emulator {d['emulator_perplexity_before']:.2f} "
            f"before distillation, {d['emulator_perplexity_after']:.2f} after"
        )


@settings_command(
    config=Settings(OffsiteConfig, exclude={"train"}),
    train=Settings(TrainConfig),
    runtime=Settings(RuntimeSettings),
)
def train_offsite_command(
    emulator: Path = typer.Argument(..., help="Emulator directory from `splitprefix emulate`."),
    data: Path = typer.Option(..., "--data", help="Training JSONL."),
    out: Path = typer.Option(
        ..., "--out", help="Prefix directory to write; rerunning resumes its checkpoint."
    ),
    eval_data: Path | None = typer.Option(
        None, "--eval-data", help="Held-out JSONL (default: a slice of --data)."
    ),
    *,
    config: OffsiteConfig,
    train: TrainConfig,
    runtime: RuntimeSettings,
) -> None:
    """Data party: train a prefix on the emulator, offline, and evaluate it on held-out data."""
    from splitprefix.data_party.offsite import train_offsite

    config = replace(config, train=train)
    report = train_offsite(emulator, data, out, config, eval_data, runtime)
    typer.echo(
        json.dumps(
            {k: v for k, v in report.items() if k != "held_out"}
            | {"held_out": {k: v for k, v in report.get("held_out", {}).items() if k != "samples"}},
            indent=2,
        )
    )


def integrate_command(
    prefix: Path = typer.Argument(..., help="Emulator-layout prefix from `train-offsite`."),
    emulator: Path = typer.Option(..., "--emulator", help="The emulator it was trained on."),
    out: Path = typer.Option(..., "--out", help="Full-model prefix directory to write."),
    dropped: str = typer.Option(
        "auto",
        help="Prefix of dropped layers: their 'stand-in' layer's, or 'zeros'; 'auto' takes zeros for a "
        "distilled emulator and the stand-in's otherwise.",
    ),
) -> None:
    """Data party: map an emulator-layout prefix onto all L layers of the full model."""
    from splitprefix.data_party.offsite import integrate

    mode: Literal["auto", "stand-in", "zeros"] = dropped  # type: ignore[assignment]
    full = integrate(prefix, emulator, out, mode)
    typer.echo(f"full-model prefix ({full.config.num_layers} layers) written to {out}")
