"""The data party's prefix training loop.

The loop only sees a loss function of (batch, prefix kv), so the same loop trains through a local
model (the emulator, or the whole model in the lab) and, later, through the split model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from splitprefix.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from splitprefix.data.batching import Batch, EncodedExample, collate, iterate_batches
from splitprefix.errors import ConfigError
from splitprefix.evaluation.metrics import token_loss_sum
from splitprefix.model.prefix import Prefix
from splitprefix.model.prefixed import forward_with_prefix

LossFn = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, int]]
"""(batch, prefix kv) -> (summed token loss, supervised token count)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for prefix training."""

    steps: int = 200
    """Optimiser steps."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 1e-2
    """Peak learning rate of AdamW."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay on the prefix."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    seed: int = 0
    """Seed for the data order."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints, when a checkpoint folder is given; 0 disables them."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be >= 1; got {self.steps}, {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}]; got {self.warmup_steps}")


@dataclass
class TrainHistory:
    """Per-step training losses."""

    losses: list[float] = field(default_factory=list)
    """Mean token loss of each step's batch."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def batches_forever(
    encoded: list[EncodedExample], batch_size: int, pad_id: int, seed: int
) -> Iterator[Batch]:
    """Right-padded batches, reshuffled every epoch, without end."""
    if not encoded:
        raise ConfigError("no training example")
    epoch = 0
    while True:
        for chunk in iterate_batches(encoded, batch_size, shuffle=True, seed=seed + epoch):
            yield collate(chunk, pad_id)
        epoch += 1


def train_prefix(
    prefix: Prefix,
    loss_fn: LossFn,
    encoded: list[EncodedExample],
    pad_id: int,
    config: TrainConfig,
    checkpoint_root: Path | None = None,
    desc: str = "train",
) -> TrainHistory:
    """Train `prefix` in place for `config.steps` steps and return the loss history.

    With `checkpoint_root`, a checkpoint is written every `config.checkpoint_every` steps and a rerun
    of the same job resumes from the newest one, with the same batches as an uninterrupted run.
    """
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, config))
    history, start = TrainHistory(), 0
    if checkpoint_root is not None:
        check_resumable(checkpoint_root, {**asdict(config), "prefix": asdict(prefix.config)})
        start, extra = load_checkpoint(checkpoint_root, prefix, optimizer, scheduler)
        history.losses = extra.get("losses", [])
    batches = batches_forever(encoded, config.batch_size, pad_id, config.seed)
    for _ in range(start):
        next(batches)
    bar = tqdm(range(start, config.steps), desc=desc, initial=start, total=config.steps, disable=None)
    for step in bar:
        loss_sum, n = loss_fn(next(batches), prefix())
        loss = loss_sum / max(n, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(prefix.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        history.losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (
            checkpoint_root is not None
            and config.checkpoint_every
            and (step + 1) % config.checkpoint_every == 0
        ):
            save_checkpoint(
                checkpoint_root, step + 1, prefix, optimizer, scheduler, {"losses": history.losses}
            )
    return history


def local_loss_fn(model: PreTrainedModel) -> LossFn:
    """Loss through a whole local model (the emulator, or the full model in the lab)."""

    def loss_fn(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        logits = forward_with_prefix(model, batch.input_ids, batch.attention_mask, kv)
        return token_loss_sum(logits, batch.labels)

    return loss_fn
