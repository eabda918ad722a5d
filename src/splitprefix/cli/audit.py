"""`splitprefix privacy-audit`: what the model party could recover from the wire, and at what utility."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from splitprefix.audit.inversion import InversionConfig
from splitprefix.audit.run import AuditConfig
from splitprefix.cli.options import Settings, settings_command
from splitprefix.runtime import RuntimeSettings

AUDIT_OPTIONS = {
    "audit": Settings(
        AuditConfig,
        exclude={"inversion"},
        flags={"clip_norm": "--clip", "utility_steps": "--steps"},
        helps={
            "split_at": "Cut K to audit; repeat for several (default: the emulator's K).",
            "noise": "Noise multiplier sigma; repeat for several.",
            "clip_norm": "Clip norm C (default: median layer-K token norm of public text).",
            "client_layers": "Top layers M the data party keeps for the head=client label attack "
            "(0 = head=client, M > 0 = the U-shaped split); repeat for several.",
            "grad_noise": "Gradient-noise multiplier rho to measure as a further defence (noise of rho x the "
            "gradient's RMS norm on what head=client sends back), per --client-layers M; repeat for several.",
        },
    ),
    "inversion": Settings(
        InversionConfig, prefix="inversion-", exclude={"seed"}, flags={"train_tokens": "--inversion-tokens"}
    ),
    "runtime": Settings(RuntimeSettings),
}
"""The audit's settings; the inversion attacker takes the audit's --seed."""


@settings_command(AUDIT_OPTIONS)
def privacy_audit_command(
    emulator: Path = typer.Argument(
        ...,
        help="Emulator directory (its manifest names the full model), or a model directory with --split-at.",
    ),
    data: Path = typer.Option(..., "--data", help="The data party's training JSONL."),
    eval_data: Path | None = typer.Option(
        None, "--eval-data", help="Held-out JSONL for the utility (default: the last 10% of --data)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    *,
    audit: AuditConfig,
    inversion: InversionConfig,
    runtime: RuntimeSettings,
) -> None:
    """Play the curious model party: token recovery rates and utility for each K and noise level."""
    from splitprefix.audit.run import run_audit

    config = replace(audit, inversion=replace(inversion, seed=audit.seed))
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
