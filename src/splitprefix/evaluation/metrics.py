"""Loss, perplexity and exact-match metrics for causal LMs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitprefix.data.batching import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of supervised tokens.

    `labels` (B, T) are aligned with the inputs; position t of `logits` (B, T, V) predicts label t+1.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shifted_labels != IGNORE_INDEX).sum())


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each position must predict (B, T): the next label, or -100 where none counts."""
    following = torch.full_like(labels, IGNORE_INDEX)
    following[:, :-1] = labels[:, 1:]
    return following


def supervised_loss_sum(
    logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """`token_loss_sum` of `logits_of(hidden)`, with `logits_of` (a head, per token) applied to the
    supervised positions of `hidden` (B, T, d) only: (N, V) logits rather than (B, T, V)."""
    targets = next_token_targets(labels).to(hidden.device)
    supervised = targets != IGNORE_INDEX
    logits = logits_of(hidden[supervised]).float()  # (N, V)
    return F.cross_entropy(logits, targets[supervised], reduction="sum"), int(supervised.sum())


def perplexity(mean_loss: float) -> float:
    """exp(loss), capped so a diverged model reports inf rather than overflowing."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def normalize_answer(text: str) -> str:
    """Collapse runs of whitespace and strip the ends: the form exact match compares."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references)
