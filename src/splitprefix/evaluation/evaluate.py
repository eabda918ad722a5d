"""Held-out evaluation of a model, with or without a prefix: loss, perplexity, exact match.

The model is either a local `PreTrainedModel` or a `LogitsFn`, e.g. the split model whose upper
layers run on the model party's server; a `LogitsFn` generates greedily by rerunning the whole
sequence for every new token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.data.batching import collate, encode_examples, iterate_batches, prompt_batch, resolve_pad_id
from splitprefix.data.formats import Example
from splitprefix.errors import ConfigError
from splitprefix.evaluation.metrics import exact_match, normalize_answer, perplexity, token_loss_sum
from splitprefix.model.prefixed import forward_with_prefix, generate_with_prefix

LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(input_ids (B, T), token mask (B, T), prefix kv (L, 2, n_kv, P, hd) or None) -> logits (B, T, V)."""

Scorer = PreTrainedModel | LogitsFn
"""What evaluation runs: a local model, or a function that computes its logits."""


def as_logits_fn(model: Scorer) -> LogitsFn:
    if isinstance(model, PreTrainedModel):
        return partial(forward_with_prefix, model)
    return model


@torch.no_grad()
def greedy_generate(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    kv: torch.Tensor | None,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
) -> torch.Tensor:
    """Greedy continuation (B, <= max_new_tokens) of left-padded prompts, without a KV cache.

    Matches `generate_with_prefix`: rows that hit EOS are padded with `pad_token_id`, and the loop
    stops once every row has.
    """
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = logits_fn(input_ids, token_mask, kv)[:, -1]  # (B, V)
        token = logits.argmax(dim=-1).masked_fill(finished, pad_token_id)  # (B,)
        new.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        token_mask = torch.cat([token_mask, token_mask.new_ones(token.shape[0], 1)], dim=1)
        if finished.all():
            break
    return torch.stack(new, dim=1) if new else input_ids[:, :0]


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate."""

    batch_size: int = 32
    """Examples per forward pass."""
    max_length: int = 256
    """Tokens kept per example (prompts are cut from the left)."""
    max_new_tokens: int | None = None
    """Generation budget for exact match; None = longest reference completion plus 4 tokens."""
    exact_match: bool = True
    """Generate greedily and score exact match on examples that have a prompt."""
    num_samples: int = 5
    """Predictions echoed in the report, for a human to look at."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError(
                f"need batch_size >= 1 and max_length >= 2; got {self.batch_size}, {self.max_length}"
            )


@torch.no_grad()
def evaluate_loss(
    model: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    kv: torch.Tensor | None = None,
    config: EvalConfig = EvalConfig(),
) -> dict[str, float]:
    """Mean next-token loss on the supervised tokens, its perplexity and the token count."""
    encoded = encode_examples(tokenizer, examples, config.max_length)
    pad_id = resolve_pad_id(tokenizer)
    logits_fn = as_logits_fn(model)
    total, count = 0.0, 0
    chunks = list(iterate_batches(encoded, config.batch_size, shuffle=False))
    for chunk in tqdm(chunks, desc="loss", leave=False, disable=None):
        batch = collate(chunk, pad_id)
        logits = logits_fn(batch.input_ids, batch.attention_mask, kv)
        loss_sum, n = token_loss_sum(logits, batch.labels)
        total, count = total + float(loss_sum), count + n
    if count == 0:
        raise ConfigError("no supervised token to evaluate: every example's completion is empty")
    mean = total / count
    return {"loss": mean, "perplexity": perplexity(mean), "n_tokens": count}


@torch.no_grad()
def generate_answers(
    model: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    kv: torch.Tensor | None,
    max_new_tokens: int,
    config: EvalConfig = EvalConfig(),
) -> list[str]:
    """Greedy completions of `prompts`, decoded without special tokens."""
    answers: list[str] = []
    chunks = list(iterate_batches(prompts, config.batch_size, shuffle=False))
    for chunk in tqdm(chunks, desc="generate", leave=False, disable=None):
        batch = prompt_batch(tokenizer, chunk, "left", config.max_length)
        pad_id = resolve_pad_id(tokenizer)
        if isinstance(model, PreTrainedModel):
            new = generate_with_prefix(
                model, batch.input_ids, batch.attention_mask, kv, max_new_tokens, pad_id
            )
        else:
            eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None
            new = greedy_generate(
                model, batch.input_ids, batch.attention_mask, kv, max_new_tokens, pad_id, eos
            )
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def generation_budget(tokenizer: PreTrainedTokenizerBase, prompted: list[Example], config: EvalConfig) -> int:
    """New tokens exact match generates: `config.max_new_tokens`, else the longest reference plus 4."""
    return config.max_new_tokens or 4 + max(len(tokenizer.encode(e.completion)) for e in prompted)


def evaluate(
    model: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    kv: torch.Tensor | None = None,
    config: EvalConfig = EvalConfig(),
) -> dict[str, Any]:
    """Loss, perplexity and token count; plus exact match when examples have prompts."""
    report: dict[str, Any] = {
        "n_examples": len(examples),
        **evaluate_loss(model, tokenizer, examples, kv, config),
    }
    prompted = [e for e in examples if e.prompt]
    if not (config.exact_match and prompted):
        return report
    budget = generation_budget(tokenizer, prompted, config)
    answers = generate_answers(model, tokenizer, [e.prompt for e in prompted], kv, budget, config)
    references = [e.completion for e in prompted]
    report["exact_match"] = exact_match(answers, references)
    report["samples"] = [
        {"prompt": e.prompt, "expected": normalize_answer(e.completion), "predicted": normalize_answer(a)}
        for e, a in zip(prompted[: config.num_samples], answers, strict=False)
    ]
    return report
