"""Held-out evaluation of a model, with or without a prefix: loss, perplexity, exact match.

The model is either a local `PreTrainedModel` or a `Scorer`, e.g. the split model whose upper
layers run on the model party's server: a batched loss, and KV-cached greedy generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.data.batching import (
    Batch,
    collate,
    encode_examples,
    iterate_batches,
    prompt_batch,
    resolve_pad_id,
)
from splitprefix.data.formats import Example
from splitprefix.errors import ConfigError
from splitprefix.evaluation.metrics import exact_match, normalize_answer, perplexity, supervised_loss_sum
from splitprefix.model.decoding import decode
from splitprefix.model.prefixed import generate_with_prefix, hidden_with_prefix
from splitprefix.model.split import Head
from splitprefix.progress import Progress

BatchLoss = Callable[[Batch, torch.Tensor | None], tuple[torch.Tensor, int]]
"""(batch, prefix kv (L, 2, n_kv, P, hd) or None) -> (summed token loss, supervised token count)."""
Generate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]
"""(left-padded ids (B, T), token mask (B, T), prefix kv or None, max new tokens) -> greedy new
tokens (B, <= max new); rows past EOS hold the pad id."""


@dataclass(frozen=True)
class Scorer:
    """What evaluation runs: a batch's summed loss, and greedy continuations of prompts."""

    loss_sum: BatchLoss
    generate: Generate


def local_scorer(model: PreTrainedModel, pad_id: int) -> Scorer:
    """The whole model in this process, with the prefix as its cache."""

    head = Head(model)

    def loss_sum(batch: Batch, kv: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        hidden = hidden_with_prefix(model, batch.input_ids, batch.attention_mask, kv)  # (B, T, d), normed
        return supervised_loss_sum(head.logits, hidden, batch.labels)

    def generate(ids: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None, new: int) -> torch.Tensor:
        return generate_with_prefix(model, ids, mask, kv, new, pad_id)

    return Scorer(loss_sum, generate)


LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids (B, T), token mask (B, T), prefix kv (L, 2, n_kv, P, hd)) -> logits (B, T, V)."""


@torch.no_grad()
def greedy_generate(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    kv: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
) -> torch.Tensor:
    """Greedy continuation (B, <= max_new_tokens) of left-padded prompts by rerunning the whole
    sequence for every token, for a model that keeps no KV cache (the audit's stand-in server).

    Matches `generate_with_prefix`: rows that hit EOS are padded with `pad_token_id`, and the loop
    stops once every row has. The tokens lie on `input_ids`' device, wherever `logits_fn` computes.
    """
    state = {"ids": input_ids, "mask": token_mask}

    def advance(token: torch.Tensor) -> torch.Tensor:
        state["ids"] = torch.cat([state["ids"], token[:, None]], dim=1)
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(token.shape[0], 1)], dim=1)
        return logits_fn(state["ids"], state["mask"], kv)[:, -1]  # (B, V)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1).to(input_ids.device)  # (B,)

    eos = None if eos_token_id is None else torch.tensor([eos_token_id], device=input_ids.device)
    first = logits_fn(input_ids, token_mask, kv)[:, -1]  # (B, V)
    new = list(decode(first, advance, choose, max_new_tokens, pad_token_id, eos))
    return torch.stack(new, dim=1) if new else input_ids[:, :0]


def as_scorer(model: PreTrainedModel | Scorer, tokenizer: PreTrainedTokenizerBase) -> Scorer:
    return local_scorer(model, resolve_pad_id(tokenizer)) if isinstance(model, PreTrainedModel) else model


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
    model: PreTrainedModel | Scorer,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    kv: torch.Tensor | None = None,
    config: EvalConfig = EvalConfig(),
) -> dict[str, float]:
    """Mean next-token loss on the supervised tokens, its perplexity and the token count."""
    encoded = encode_examples(tokenizer, examples, config.max_length)
    pad_id = resolve_pad_id(tokenizer)
    scorer = as_scorer(model, tokenizer)
    total, count = 0.0, 0
    chunks = list(iterate_batches(encoded, config.batch_size, shuffle=False))
    for chunk in Progress(chunks, "held-out loss"):
        loss_sum, n = scorer.loss_sum(collate(chunk, pad_id), kv)
        total, count = total + float(loss_sum), count + n
    if count == 0:
        raise ConfigError("no supervised token to evaluate: every example's completion is empty")
    mean = total / count
    return {"loss": mean, "perplexity": perplexity(mean), "n_tokens": count}


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel | Scorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    kv: torch.Tensor | None,
    max_new_tokens: int,
    config: EvalConfig = EvalConfig(),
) -> list[str]:
    """Greedy completions of `prompts`, decoded without special tokens."""
    scorer = as_scorer(model, tokenizer)
    answers: list[str] = []
    chunks = list(iterate_batches(prompts, config.batch_size, shuffle=False))
    for chunk in Progress(chunks, "exact match"):
        batch = prompt_batch(tokenizer, chunk, "left", config.max_length)
        new = scorer.generate(batch.input_ids, batch.attention_mask, kv, max_new_tokens)
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def generation_budget(tokenizer: PreTrainedTokenizerBase, prompted: list[Example], config: EvalConfig) -> int:
    """New tokens exact match generates: `config.max_new_tokens`, else the longest reference plus 4."""
    return config.max_new_tokens or 4 + max(len(tokenizer.encode(e.completion)) for e in prompted)


def evaluate(
    model: PreTrainedModel | Scorer,
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
