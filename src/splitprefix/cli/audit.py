"""`splitprefix privacy-audit`: what the model party could recover from the wire, and at what utility."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from splitprefix.audit.inversion import InversionConfig
from splitprefix.audit.run import AuditConfig
from splitprefix.cli.train import DEVICE_OPTION, DTYPE_OPTION, runtime_settings


def privacy_audit_command(
    emulator: Path = typer.Argument(
        ...,
        help="Emulator directory (its manifest names the full model), or a model directory with --split-at.",
    ),
    data: Path = typer.Option(..., "--data", help="The data party's training JSONL."),
    eval_data: Path | None = typer.Option(
        None, "--eval-data", help="Held-out JSONL for the utility (default: the last 10% of --data)."
    ),
    split_at: list[int] = typer.Option([], "--split-at", help="Cut K to audit; repeat for several."),
    noise: list[float] = typer.Option([0.0], "--noise", help="Noise multiplier sigma; repeat for several."),
    clip: float | None = typer.Option(
        None, "--clip", help="Clip norm C (default: median layer-K token norm of public text)."
    ),
    attack_tokens: int = typer.Option(AuditConfig.attack_tokens, help="Tokens the attacks try to recover."),
    steps: int = typer.Option(AuditConfig.utility_steps, help="Split-training steps for the utility."),
    prefix_len: int = typer.Option(AuditConfig.prefix_len, help="Virtual tokens of the trained prefix."),
    eval_examples: int = typer.Option(AuditConfig.eval_examples, help="Held-out examples for the utility."),
    inversion_tokens: int = typer.Option(
        InversionConfig.train_tokens, help="Public-text tokens the inversion attacker trains on."
    ),
    inversion_steps: int = typer.Option(
        InversionConfig.steps, help="Training steps of the inversion attacker."
    ),
    seed: int = typer.Option(AuditConfig.seed, help="Seed of the prefix, data order and noise."),
    client_layers: list[int] = typer.Option(
        list(AuditConfig.client_layers),
        "--client-layers",
        help="Top layers M the data party keeps for the head=client label attack (0 = head=client, "
        "M > 0 = the U-shaped split); repeat for several.",
    ),
    grad_noise: list[float] = typer.Option(
        [],
        "--grad-noise",
        help="Gradient-noise multiplier rho to measure as a further defence (noise of rho x the gradient's "
        "RMS norm on what head=client sends back), per --client-layers M; repeat for several.",
    ),
    known_prefix: bool = typer.Option(
        False,
        "--known-prefix",
        help="Also attack with the data party's bottom prefix known (a federation's aggregator).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Play the curious model party: token recovery rates and utility for each K and noise level."""
    from splitprefix.audit.run import run_audit

    runtime = runtime_settings(device, dtype)  # settings first: a typo fails before any loading
    config = AuditConfig(
        split_at=tuple(split_at),
        noise=tuple(noise),
        clip_norm=clip,
        attack_tokens=attack_tokens,
        utility_steps=steps,
        prefix_len=prefix_len,
        eval_examples=eval_examples,
        seed=seed,
        known_prefix=known_prefix,
        client_layers=tuple(client_layers),
        grad_noise=tuple(grad_noise),
        inversion=InversionConfig(train_tokens=inversion_tokens, steps=inversion_steps, seed=seed),
    )
    report = run_audit(emulator, data, config, eval_data, runtime)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        "K  sigma  C  nearest  learned  labels(head=server)  labels(head=client, M=..)  loss  exact_match  epsilon"
    )
    for row in report["settings"]:
        u = row["utility"]
        typer.echo(
            f"{row['split_at']}  {row['noise_multiplier']}  {row['clip_norm']}  "
            f"{row['nearest_neighbour']['recovery']:.3f}  {row['learned_inversion']['recovery']:.3f}  "
            f"{row['head_server_labels']['recovery']:.3f}  {_client_labels(row)}  {u['loss']:.3f}  {u.get('exact_match', 0):.3f}  "
            f"{_epsilon(row)}"
        )
        for noised in row.get("gradient_noise", []):
            typer.echo(
                f"  K={row['split_at']} M={noised['client_layers']} rho={noised['grad_noise']}: labels "
                f"{noised['labels']['recovery']:.3f}, loss {noised['utility']['loss']:.3f}, step "
                f"{noised['utility']['step_s']} s"
            )


def _epsilon(row: dict) -> str:
    """The setting's epsilon at the report's delta; '-' with the option off, 'none' without noise."""
    spent = row.get("privacy")
    if spent is None:
        return "-"
    return "none" if spent["epsilon"] is None else f"{spent['epsilon']:.4g}"


def _client_labels(row: dict) -> str:
    """Label recovery from head=client gradients per M kept at the data party: 'M=0:1.000,M=1:...'."""
    rows = row.get("head_client_labels") or []
    return ",".join(f"M={r['client_layers']}:{r['recovery']:.3f}" for r in rows) or "-"
