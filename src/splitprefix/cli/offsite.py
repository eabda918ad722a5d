"""The offsite commands: `emulate` (model party), `train-offsite` and `integrate` (data party)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import typer

from splitprefix.cli.train import DEVICE_OPTION, DTYPE_OPTION, runtime_settings
from splitprefix.data_party.offsite import OffsiteConfig
from splitprefix.data_party.train import TrainConfig
from splitprefix.model_party.compress import DistillConfig


def emulate_command(
    model: str = typer.Argument(..., help="Full model directory, or 'builtin'."),
    split_at: int = typer.Option(..., "--split-at", help="K: the data party runs layers [0, K)."),
    keep: int = typer.Option(
        ..., "--keep", help="N: upper layers kept by uniform layer drop (1 <= N < L - K)."
    ),
    out: Path = typer.Option(..., "--out", help="Emulator directory to write."),
    distill: Path | None = typer.Option(
        None,
        "--distill",
        help="JSONL general corpus: distil the kept layers on it (default for 'builtin': the corpus "
        "it was pretrained on; for other models: no distillation).",
    ),
    no_distill: bool = typer.Option(False, "--no-distill", help="Plain layer drop, no distillation."),
    distill_steps: int = typer.Option(DistillConfig.steps, help="Distillation steps."),
    distill_lr: float = typer.Option(DistillConfig.lr, help="Distillation learning rate."),
    distill_loss: str = typer.Option(DistillConfig.loss, help="Match 'hidden' states, 'logits', or 'both'."),
    distill_prefix_len: int = typer.Option(
        DistillConfig.prefix_len,
        help="Prefix-aware distillation: virtual tokens of the random prefix attached at each step (0: none).",
    ),
    distill_prefix_std: float = typer.Option(
        DistillConfig.prefix_std, help="Scale of those random prefixes."
    ),
    client_layers: int = typer.Option(
        0,
        "--client-layers",
        help="M: ship the full model's last M layers exactly (of the N kept; never distilled), so that "
        "data parties may keep them (the U-shaped split, which hides the labels' gradient).",
    ),
) -> None:
    """Model party: build the emulator (bit-identical bottom K layers, N kept upper layers) and its manifest."""
    from splitprefix.model.builtin import BUILTIN_NAME
    from splitprefix.model_party.compress import PRETRAINING_CORPUS, emulate

    config = DistillConfig(
        steps=distill_steps,
        lr=distill_lr,
        loss=distill_loss,  # type: ignore[arg-type]
        prefix_len=distill_prefix_len,
        prefix_std=distill_prefix_std,
    )
    corpus: Path | str | None = distill
    if no_distill:
        corpus = None
    elif corpus is None and model == BUILTIN_NAME:
        corpus = PRETRAINING_CORPUS
    manifest = emulate(model, split_at, keep, out, corpus, config, client_layers)
    typer.echo(f"emulator written to {out}: kept layers {manifest.kept_layers} of L={manifest.num_layers}")
    if manifest.distillation:
        d = manifest.distillation
        typer.echo(
            f"perplexity full {d['full_perplexity']:.2f}; emulator {d['emulator_perplexity_before']:.2f} "
            f"before distillation, {d['emulator_perplexity_after']:.2f} after"
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
    prefix_len: int = typer.Option(OffsiteConfig.prefix_len, help="Virtual tokens per layer."),
    projection_dim: int | None = typer.Option(None, help="MLP reparameterisation width."),
    steps: int = typer.Option(TrainConfig.steps, help="Optimiser steps."),
    epochs: float | None = typer.Option(None, help="Passes over the data (overrides --steps)."),
    lr: float = typer.Option(TrainConfig.lr, help="Peak learning rate."),
    batch_size: int = typer.Option(TrainConfig.batch_size, help="Examples per step."),
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every, help="Steps between checkpoints."),
    seed: int = typer.Option(TrainConfig.seed, help="Seed of the data order."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Data party: train a prefix on the emulator, offline, and evaluate it on held-out data."""
    from splitprefix.data_party.offsite import train_offsite

    train = TrainConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    config = OffsiteConfig(prefix_len=prefix_len, projection_dim=projection_dim, epochs=epochs, train=train)
    report = train_offsite(emulator, data, out, config, eval_data, runtime_settings(device, dtype))
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
        "stand-in", help="Prefix of dropped layers: their 'stand-in' layer's, or 'zeros'."
    ),
) -> None:
    """Data party: map an emulator-layout prefix onto all L layers of the full model."""
    from splitprefix.data_party.offsite import integrate

    mode: Literal["stand-in", "zeros"] = dropped  # type: ignore[assignment]
    full = integrate(prefix, emulator, out, mode)
    typer.echo(f"full-model prefix ({full.config.num_layers} layers) written to {out}")
