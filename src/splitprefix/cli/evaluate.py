"""`splitprefix eval`: held-out loss, perplexity and exact match of a model, with or without a prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from splitprefix.cli.train import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    NOISE_SEED_HELP,
    TOKEN_ENV,
    client_settings,
    privacy_config,
    privacy_line,
    runtime_settings,
)
from splitprefix.data.formats import Example
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.evaluation.evaluate import EvalConfig
from splitprefix.runtime import RuntimeSettings


def eval_command(
    model: str = typer.Argument(..., help="Model directory, or 'builtin'."),
    data: Path = typer.Option(..., "--data", help="JSONL file: prompt/completion, text or Alpaca records."),
    prefix: Path | None = typer.Option(None, "--prefix", help="Prefix directory written by splitprefix."),
    batch_size: int = typer.Option(EvalConfig.batch_size, help="Examples per forward pass."),
    max_length: int = typer.Option(EvalConfig.max_length, help="Tokens kept per example."),
    max_new_tokens: int | None = typer.Option(None, help="Generation budget for exact match."),
    no_exact_match: bool = typer.Option(False, "--no-exact-match", help="Skip generation."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    server: str | None = typer.Option(
        None, "--server", help="Evaluate through the split: MODEL is then the emulator, the top runs here."
    ),
    head: str = typer.Option(
        "server",
        help="With --server: 'server' (default, as in the method) or 'client' (the norm and head run here).",
    ),
    token: str | None = typer.Option(None, "--token", envvar=TOKEN_ENV, help="With --server: bearer token."),
    wire_dtype: str = typer.Option("fp32", help="With --server: fp32, bf16 or fp16 on the wire."),
    clip: float | None = typer.Option(None, "--clip", help="With --server: clip each sent state to norm C."),
    noise: float = typer.Option(0.0, "--noise", help="With --server: noise of std noise * C on sent states."),
    noise_seed: int | None = typer.Option(None, "--noise-seed", help=f"With --server: {NOISE_SEED_HELP}"),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Evaluate MODEL (optionally with --prefix) on --data: loss, perplexity, n_tokens, exact_match."""
    from splitprefix.data.formats import load_jsonl

    config = EvalConfig(batch_size, max_length, max_new_tokens, not no_exact_match)
    runtime = runtime_settings(device, dtype)  # settings first: a typo fails before any loading
    examples = load_jsonl(data)
    if server is None:
        report = _evaluate_whole(model, examples, prefix, config, runtime)
    else:
        settings = client_settings(server, token, head, wire_dtype)
        privacy = privacy_config(clip, noise, noise_seed)
        report = _evaluate_split(model, settings, examples, prefix, config, privacy, runtime)
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
