"""`splitprefix federate`: a whole federation of data parties on this machine (Flower simulation)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from splitprefix.cli.train import DEVICE_OPTION, DTYPE_OPTION, runtime_settings
from splitprefix.federation.config import FederationConfig, PartyConfig


def federate_command(
    emulator: Path = typer.Argument(..., help="Emulator directory the parties run (`splitprefix emulate`)."),
    data: list[Path] = typer.Option(
        ..., "--data", help="A party's training JSONL; repeat once per party, or give one with --parties."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder for the joint prefix (out/prefix), rounds.jsonl and results.json."
    ),
    parties: int | None = typer.Option(None, help="Cut the single --data file into this many parties."),
    alpha: float = typer.Option(100.0, help="Label skew of that cut: 0.1 = non-IID, 100 = about IID."),
    model: str | None = typer.Option(
        None, "--model", help="Full model to serve in a child process on loopback (or 'builtin')."
    ),
    server: str | None = typer.Option(None, "--server", help="URL of a running `splitprefix serve`."),
    token: str | None = typer.Option(
        None, "--token", envvar="SPLITPREFIX_TOKEN", help="Bearer token for --server."
    ),
    eval_data: Path | None = typer.Option(
        None, "--eval-data", help="Operator's held-out JSONL, evaluated after every round."
    ),
    exact_match: bool = typer.Option(False, "--exact-match", help="Also score exact match each round."),
    rounds: int = typer.Option(FederationConfig.num_rounds, help="Federation rounds."),
    min_replies: int = typer.Option(
        FederationConfig.min_replies, help="Successful parties a round needs to update the prefix."
    ),
    local_steps: int = typer.Option(PartyConfig.local_steps, help="Optimiser steps per party per round."),
    local_epochs: float | None = typer.Option(None, help="Passes over each party's data per round."),
    batch_size: int = typer.Option(PartyConfig.batch_size, help="Examples per step."),
    lr: float = typer.Option(PartyConfig.lr, help="Peak learning rate of the parties' optimiser."),
    strategy: str = typer.Option(
        FederationConfig.strategy,
        help="Aggregation: fedavg (weighted by examples, the reference), fedavgm, fedadam, fedyogi, fedadagrad.",
    ),
    server_lr: float = typer.Option(FederationConfig.server_lr, help="The server optimiser's learning rate."),
    server_momentum: float = typer.Option(FederationConfig.server_momentum, help="FedAvgM's momentum."),
    server_tau: float = typer.Option(FederationConfig.server_tau, help="FedAdam/FedYogi/FedAdagrad's tau."),
    local_optimizer: str = typer.Option(PartyConfig.optimizer, help="The parties' optimiser: adamw or sgd."),
    keep_optimizer_state: bool = typer.Option(
        PartyConfig.keep_optimizer_state,
        help="Each party keeps its AdamW moments from round to round (they never leave it).",
    ),
    lr_schedule: str = typer.Option(
        PartyConfig.lr_schedule,
        help="round: the lr decays within each round; run: one decay over all rounds.",
    ),
    prefix_len: int = typer.Option(FederationConfig.prefix_len, help="Virtual tokens per layer."),
    head: str = typer.Option(
        PartyConfig.head,
        help="'client' keeps the targets off the wire (the model party can still recover them from the "
        "gradients it is sent); 'server' sends them.",
    ),
    secure: bool = typer.Option(
        False, "--secure", help="Aggregate with SecAgg+ (the server sees only sums)."
    ),
    secagg_max_weight: float = typer.Option(
        FederationConfig.secagg_max_weight, help="SecAgg+: the largest examples-per-round of any party."
    ),
    max_examples: int = typer.Option(
        FederationConfig.max_examples,
        help="Largest num-examples a party may report per round (0 = local steps x batch size).",
    ),
    clip: float | None = typer.Option(
        None, "--clip", help="Each party clips its layer-K token states to this L2 norm C."
    ),
    noise: float = typer.Option(
        0.0, "--noise", help="Each party adds Gaussian noise of std noise * C (fresh OS randomness)."
    ),
    party_cpus: float = typer.Option(1.0, help="CPUs reserved per simulated party."),
    seed: int = typer.Option(0, help="Seed of the prefix, the data order and the cut."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Run N data parties against one model party locally, as a Flower simulation; write results.json."""
    import logging

    from splitprefix import interrupts
    from splitprefix.federation.local import LocalFederation, run_local_federation

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("splitprefix.federation", "splitprefix.federation.server_app"):
        logging.getLogger(name).setLevel(logging.INFO)  # one progress line per round
    flower: dict[str, bool | float | int | str] = {
        "num-rounds": rounds,
        "min-replies": min_replies,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "lr": lr,
        "strategy": strategy,
        "server-lr": server_lr,
        "server-momentum": server_momentum,
        "server-tau": server_tau,
        "optimizer": local_optimizer,
        "lr-schedule": lr_schedule,
        "keep-optimizer-state": keep_optimizer_state,
        "prefix-len": prefix_len,
        "head": head,
        "secure": secure,
        "secagg-max-weight": secagg_max_weight,
        "exact-match": exact_match,
        "seed": seed,
        "device": runtime_settings(device, dtype).device,
        "dtype": dtype,
    }
    if local_epochs is not None:
        flower["local-epochs"] = local_epochs
    if max_examples:
        flower["max-examples"] = max_examples
    if clip is not None:
        flower["clip-norm"] = clip
    if noise:
        flower["noise-multiplier"] = noise
    if eval_data is not None:
        flower["eval-data"] = str(eval_data)
    run = LocalFederation(
        emulator_dir=str(emulator),
        data_files=tuple(str(d) for d in data),
        out_dir=str(out),
        parties=parties,
        alpha=alpha,
        model=model,
        server_url=server,
        token=token,
        party_cpus=party_cpus,
        flower=flower,
    )
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
