"""`splitprefix eval`: held-out loss, perplexity and exact match of a model, with or without a prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from splitprefix.cli.options import Settings, settings_command
from splitprefix.cli.train import PRIVACY_OPTIONS, TOKEN_ENV, privacy_line
from splitprefix.data.formats import Example
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.evaluation.evaluate import EvalConfig
from splitprefix.runtime import RuntimeSettings

EVAL_OPTIONS = {
    "config": Settings(EvalConfig),
    "client": Settings(
        ClientSettings,
        exclude={"keep_graph"},  # evaluation has no backward
        flags={"server_url": "--server", "ca_path": "--ca"},
        envvars={"token": TOKEN_ENV},
        defaults={"server_url": None},
        none_unless={"server_url"},
        helps={"server_url": "Evaluate through the split: MODEL is then the emulator, the top runs here."},
    ),
    "privacy": PRIVACY_OPTIONS,
    "runtime": Settings(RuntimeSettings),
}
"""`eval`'s settings; the connection and the noise apply with --server only."""


@settings_command(EVAL_OPTIONS)
def eval_command(
    model: str = typer.Argument(..., help="Model directory, or 'builtin'."),
    data: Path = typer.Option(..., "--data", help="JSONL file: prompt/completion, text or Alpaca records."),
    prefix: Path | None = typer.Option(None, "--prefix", help="Prefix directory written by splitprefix."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    *,
    config: EvalConfig,
    client: ClientSettings | None,
    privacy: PrivacyConfig | None,
    runtime: RuntimeSettings,
) -> None:
    """Evaluate MODEL (optionally with --prefix) on --data: loss, perplexity, n_tokens, exact_match."""
    from splitprefix.data.formats import load_jsonl

    examples = load_jsonl(data)
    if client is None:
        report = _evaluate_whole(model, examples, prefix, config, runtime)
    else:
        report = _evaluate_split(model, client, examples, prefix, config, privacy, runtime)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key in ("n_examples", "n_tokens", "loss", "perplexity", "exact_match"):
        if key in report:
            typer.echo(
                f"{key}: {report[key]:.4g}" if isinstance(report[key], float) else f"{key}: {report[key]}"
            )
    if "privacy" in report:
        typer.echo(privacy_line(report["privacy"]))


def _evaluate_whole(
    model: str, examples: list[Example], prefix: Path | None, config: EvalConfig, runtime: RuntimeSettings
) -> dict[str, Any]:
    from splitprefix.evaluation.evaluate import evaluate
    from splitprefix.model.loading import load_causal_lm, load_tokenizer
    from splitprefix.model.prefix import Prefix

    lm = load_causal_lm(model, runtime.torch_dtype, device=runtime.device)
    kv = None
    if prefix is not None:
        loaded = Prefix.load(prefix)
        loaded.config.check_fits(lm.config)
        kv = loaded().detach()
    return evaluate(lm, load_tokenizer(model), examples, kv, config)


def _evaluate_split(
    emulator: str,
    settings: ClientSettings,
    examples: list[Example],
    prefix: Path | None,
    config: EvalConfig,
    privacy: PrivacyConfig | None,
    runtime: RuntimeSettings,
) -> dict[str, Any]:
    from splitprefix.data_party.accounting import held_out_releases, privacy_report
    from splitprefix.data_party.generate import split_scorer
    from splitprefix.data_party.session import open_split
    from splitprefix.evaluation.evaluate import evaluate
    from splitprefix.model.prefix import Prefix

    session = open_split(emulator, settings, privacy, runtime)
    try:
        kv = None
        if prefix is not None:
            loaded = Prefix.load(prefix).fold()
            session.check_prefix(loaded, f"the prefix {prefix}")
            kv = loaded().detach()
        report = evaluate(split_scorer(session), session.tokenizer, examples, kv, config)
    finally:
        session.close()
    releases = {"evaluated": held_out_releases(session.tokenizer, examples, config, 1)}
    spent = privacy_report(privacy, releases)
    return report | ({"privacy": spent} if spent else {})
