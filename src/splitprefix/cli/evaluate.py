"""`splitprefix eval`: held-out loss, perplexity and exact match of a model, with or without a prefix."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from splitprefix.evaluation.evaluate import EvalConfig


def eval_command(
    model: str = typer.Argument(..., help="Model directory, or 'builtin'."),
    data: Path = typer.Option(..., "--data", help="JSONL file: prompt/completion, text or Alpaca records."),
    prefix: Path | None = typer.Option(None, "--prefix", help="Prefix directory written by splitprefix."),
    batch_size: int = typer.Option(EvalConfig.batch_size, help="Examples per forward pass."),
    max_length: int = typer.Option(EvalConfig.max_length, help="Tokens kept per example."),
    max_new_tokens: int | None = typer.Option(None, help="Generation budget for exact match."),
    no_exact_match: bool = typer.Option(False, "--no-exact-match", help="Skip generation."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Evaluate MODEL (optionally with --prefix) on --data: loss, perplexity, n_tokens, exact_match."""
    from splitprefix.data.formats import load_jsonl
    from splitprefix.evaluation.evaluate import evaluate
    from splitprefix.model.loading import load_causal_lm, load_tokenizer
    from splitprefix.model.prefix import Prefix

    config = EvalConfig(batch_size, max_length, max_new_tokens, not no_exact_match)
    examples = load_jsonl(data)
    lm = load_causal_lm(model)
    kv = None
    if prefix is not None:
        loaded = Prefix.load(prefix)
        loaded.config.check_fits(lm.config)
        kv = loaded().detach()
    report = evaluate(lm, load_tokenizer(model), examples, kv, config)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key in ("n_examples", "n_tokens", "loss", "perplexity", "exact_match"):
        if key in report:
            typer.echo(
                f"{key}: {report[key]:.4g}" if isinstance(report[key], float) else f"{key}: {report[key]}"
            )
