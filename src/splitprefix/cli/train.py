"""`splitprefix train`: the data party refines a full-model prefix through the model party's server."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.split_train import SplitTrainConfig
from splitprefix.data_party.train import TrainConfig
from splitprefix.runtime import RuntimeSettings

TOKEN_ENV = "SPLITPREFIX_TOKEN"
DEVICE_OPTION = typer.Option(
    RuntimeSettings.device,
    "--device",
    help="Torch device of this party's model parts: cpu, cuda, cuda:N, mps.",
)
DTYPE_OPTION = typer.Option(
    RuntimeSettings.dtype,
    "--dtype",
    help="Dtype of the frozen model parts: fp32, bf16, fp16 (the prefix stays fp32).",
)


def runtime_settings(device: str, dtype: str) -> RuntimeSettings:
    """RuntimeSettings from --device and --dtype; the dataclass validates them."""
    return RuntimeSettings(device=device, dtype=dtype)  # type: ignore[arg-type]


def client_settings(
    server: str,
    token: str | None,
    head: str,
    wire_dtype: str,
    recompute: bool = False,
    timeout_s: float = ClientSettings.timeout_s,
    max_retries: int = ClientSettings.max_retries,
    ca_path: Path | None = None,
    client_layers: int = 0,
) -> ClientSettings:
    """ClientSettings from command-line values; the dataclass validates them."""
    return ClientSettings(
        server_url=server,
        token=token,
        head=head,  # type: ignore[arg-type]
        client_layers=client_layers,
        wire_dtype=wire_dtype,  # type: ignore[arg-type]
        keep_graph=not recompute,
        timeout_s=timeout_s,
        max_retries=max_retries,
        ca_path=ca_path,
    )


NOISE_SEED_HELP = (
    "Replay the noise from this seed, for tests only: whoever knows it can remove the noise. "
    "Default: fresh noise from the OS's cryptographic source."
)


def privacy_config(clip: float | None, noise: float, seed: int | None) -> PrivacyConfig | None:
    """The --clip/--noise options as a PrivacyConfig; None when both are off."""
    if clip is None and noise == 0:
        return None
    return PrivacyConfig(clip_norm=clip, noise_multiplier=noise, seed=seed)


def train_command(
    emulator: Path = typer.Argument(
        ..., help="Emulator directory from the model party (`splitprefix emulate`)."
    ),
    server: str = typer.Option(
        ..., "--server", help="URL of `splitprefix serve`, e.g. http://127.0.0.1:8000."
    ),
    data: Path = typer.Option(..., "--data", help="Training JSONL."),
    out: Path = typer.Option(
        ..., "--out", help="Prefix directory to write; rerunning resumes its checkpoint."
    ),
    init: Path | None = typer.Option(
        None, "--init", help="Full-layout prefix to start from (e.g. from `splitprefix integrate`)."
    ),
    eval_data: Path | None = typer.Option(
        None, "--eval-data", help="Held-out JSONL (default: a slice of --data)."
    ),
    head: str = typer.Option(
        ClientSettings.head,
        help="'server' sends the targets in clear; 'client' keeps them off the wire, but the model party "
        "can still recover them from the gradients it is sent.",
    ),
    client_layers: int = typer.Option(
        ClientSettings.client_layers,
        "--client-layers",
        help="M: also keep the top M layers here (U-shaped split, head=client): the server runs [K, L - M) "
        "and the gradient sent back is dL/dh_{L-M}. Needs an emulator built with --client-layers >= M.",
    ),
    token: str | None = typer.Option(
        None, "--token", envvar=TOKEN_ENV, help="Bearer token from the model party."
    ),
    wire_dtype: str = typer.Option(
        ClientSettings.wire_dtype, help="Tensors on the wire: fp32, bf16 or fp16."
    ),
    recompute: bool = typer.Option(
        False, "--recompute", help="Stateless server: it recomputes for each backward."
    ),
    prefix_len: int | None = typer.Option(
        None, help="Virtual tokens per layer (default: --init's, else 16)."
    ),
    max_length: int = typer.Option(SplitTrainConfig.max_length, help="Tokens kept per example."),
    steps: int = typer.Option(TrainConfig.steps, help="Optimiser steps."),
    epochs: float | None = typer.Option(None, help="Passes over the data (overrides --steps)."),
    lr: float = typer.Option(TrainConfig.lr, help="Peak learning rate."),
    batch_size: int = typer.Option(TrainConfig.batch_size, help="Examples per micro-batch."),
    grad_accum: int = typer.Option(TrainConfig.grad_accum, help="Micro-batches per optimiser step."),
    eval_every: int = typer.Option(
        TrainConfig.eval_every, help="Steps between held-out evaluations (0 = at the end)."
    ),
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every, help="Steps between checkpoints."),
    seed: int = typer.Option(TrainConfig.seed, help="Seed of the prefix initialisation and data order."),
    timeout_s: float = typer.Option(ClientSettings.timeout_s, help="Seconds to wait for one answer."),
    max_retries: int = typer.Option(
        ClientSettings.max_retries, help="Retries per call on network errors and 5xx."
    ),
    ca_path: Path | None = typer.Option(None, "--ca", help="CA bundle of a self-signed https server."),
    clip: float | None = typer.Option(
        None, "--clip", help="Clip each token's layer-K state to this L2 norm C before it leaves."
    ),
    noise: float = typer.Option(
        0.0, "--noise", help="Add Gaussian noise of std noise * C to the sent states (needs --clip)."
    ),
    noise_seed: int | None = typer.Option(None, "--noise-seed", help=NOISE_SEED_HELP),
    grad_noise: float = typer.Option(
        SplitTrainConfig.grad_noise,
        "--grad-noise",
        help="head=client: noise of this many times each row's RMS gradient norm on the gradient sent back, "
        "against the model party's label inversion (measured by privacy-audit --grad-noise); 0 = off.",
    ),
    exact_match: bool = typer.Option(
        SplitTrainConfig.exact_match, help="Score exact match on the held-out prompts at the end."
    ),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Data party: train a prefix for all L layers through the server; text stays here (see --head for the labels)."""
    from splitprefix.data_party.split_train import train_split

    settings = client_settings(
        server, token, head, wire_dtype, recompute, timeout_s, max_retries, ca_path, client_layers
    )
    train = TrainConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    config = SplitTrainConfig(
        prefix_len=prefix_len,
        init=init,
        max_length=max_length,
        epochs=epochs,
        eval_data=eval_data,
        train=train,
        privacy=privacy_config(clip, noise, noise_seed),
        exact_match=exact_match,
        grad_noise=grad_noise,
    )
    report = train_split(emulator, settings, data, out, config, runtime_settings(device, dtype))
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
