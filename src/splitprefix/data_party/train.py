"""The data party's prefix training loop.

The loop only sees a loss function of (batch, prefix kv), so the same loop trains through a local
model (the emulator, or the whole model in the lab) and, later, through the split model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from splitprefix.data.batching import (
    Batch,
    EncodedExample,
    collate,
    encode_examples,
    iterate_batches,
    resolve_pad_id,
)
from splitprefix.data.formats import Example
from splitprefix.errors import ConfigError
from splitprefix.evaluation.metrics import supervised_loss_sum
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.model.prefixed import hidden_with_prefix
from splitprefix.model.split import Head
from splitprefix.progress import Progress

LossFn = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, int]]
"""(batch, prefix kv) -> (summed token loss, supervised token count)."""
OptimizerName = Literal["adamw", "sgd"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for prefix training."""

    steps: int = 200
    """Optimiser steps."""
    batch_size: int = 16
    """Examples per micro-batch (a step takes `grad_accum` of them)."""
    lr: float = 0.1
    """Peak learning rate of AdamW (suits plain keys/values; use ~1e-3 with projection_dim)."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay (at most `steps`)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the prefix."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    seed: int = 0
    """Seed for the data order."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints, when a checkpoint folder is given; 0 disables them."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; the loss is the token mean over all of them."""
    eval_every: int = 0
    """Steps between held-out evaluations, when an evaluation function is given; 0 = only at the end."""
    optimizer: OptimizerName = "adamw"
    """'adamw', or 'sgd' (plain, no momentum: its steps scale with the gradient, so it needs a larger lr)."""
    schedule_steps: int | None = None
    """Length of the warm-up and cosine schedule; None = `steps`. A run that is one piece of a longer
    schedule (a federation round) sets it to the whole length."""
    schedule_start: int = 0
    """Step of that schedule this run starts at (a federation's round r starts at (r-1) x its steps)."""

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.grad_accum) < 1:
            raise ConfigError(
                f"steps, batch_size and grad_accum must be >= 1; got {self.steps}, {self.batch_size}, {self.grad_accum}"
            )
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd'; got {self.optimizer!r}")
        if self.schedule_start < 0 or self.schedule_start + self.steps > self.schedule_length:
            raise ConfigError(
                f"steps [{self.schedule_start}, {self.schedule_start + self.steps}) must lie within the "
                f"schedule's {self.schedule_length} steps (schedule_start, schedule_steps)"
            )
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0; got {self.warmup_steps}")

    @property
    def schedule_length(self) -> int:
        """Steps of the whole warm-up and cosine schedule this run is part of."""
        return self.steps if self.schedule_steps is None else self.schedule_steps


@dataclass
class TrainHistory:
    """Per-step training losses and the held-out evaluations made along the way."""

    losses: list[float] = field(default_factory=list)
    """Mean token loss of each step's batch."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Held-out reports, each with the `step` it was made after."""


class StepHooks(NamedTuple):
    """Optional callbacks of a training run."""

    evaluate: Callable[[Prefix], dict[str, Any]] | None = None
    """Held-out evaluation of the current prefix."""
    metrics: Callable[[], dict[str, Any]] | None = None
    """Extra fields for the step's metrics line (e.g. bytes sent and received)."""
    metrics_log: Path | None = None
    """JSON-lines file that gets one line per step: loss, step time and the extra fields."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier at step `step` of the schedule: linear warm-up, then cosine decay to
    10% of the peak. The schedule lasts `config.schedule_length` steps."""
    length = config.schedule_length
    warmup = min(config.warmup_steps, length)  # short runs warm up for their whole length
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, length - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(prefix: Prefix, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser `config.optimizer` over the prefix's parameters, at the peak lr."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(prefix.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(prefix.parameters(), lr=config.lr, weight_decay=config.weight_decay)


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


def optimizer_moments(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as flat tensors, `"<param index>.<name>"` (AdamW: step,
    exp_avg, exp_avg_sq; plain SGD has none), to carry from one run to the next."""
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": torch.as_tensor(v).detach().clone() for i, s in state.items() for k, v in s.items()}


def load_moments(optimizer: torch.optim.Optimizer, moments: Mapping[str, torch.Tensor]) -> None:
    """Put `optimizer_moments`'s tensors back into a fresh `optimizer` over a prefix of the same layout."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value.clone()
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def train_prefix(
    prefix: Prefix,
    loss_fn: LossFn,
    encoded: list[EncodedExample],
    pad_id: int,
    config: TrainConfig,
    checkpoint_root: Path | None = None,
    desc: str = "train",
    hooks: StepHooks | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainHistory:
    """Train `prefix` in place for `config.steps` steps and return the history.

    With `checkpoint_root`, a checkpoint is written every `config.checkpoint_every` steps and a rerun
    of the same job resumes from the newest one, with the same batches as an uninterrupted run.
    `optimizer` (over `prefix`'s parameters, from `make_optimizer`) carries its state in from an
    earlier run, as a federation's party that keeps its AdamW moments across rounds does.
    """
    hooks = hooks or StepHooks()
    optimizer = optimizer or make_optimizer(prefix, config)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr  # LambdaLR scales from this peak, whatever an earlier run left
    first = config.schedule_start
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(first + s, config))
    history, start = TrainHistory(), 0
    if checkpoint_root is not None:
        check_resumable(checkpoint_root, {**asdict(config), "prefix": asdict(prefix.config)})
        start, extra = load_checkpoint(checkpoint_root, prefix, optimizer, scheduler)
        history.losses, history.evals = extra.get("losses", []), extra.get("evals", [])
    batches = batches_forever(encoded, config.batch_size, pad_id, config.seed)
    for _ in range(start * config.grad_accum):
        next(batches)
    bar = Progress(range(start, config.steps), desc, total=config.steps, initial=start)
    for step in bar:
        began = time.perf_counter()
        loss = _accumulate(prefix, loss_fn, batches, config.grad_accum)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(prefix.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step_s = time.perf_counter() - began  # the held-out evaluation below is not the step's
        history.losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1
        if hooks.evaluate is not None and (
            done == config.steps or (config.eval_every and done % config.eval_every == 0)
        ):
            history.evals.append({"step": done, **hooks.evaluate(prefix)})
        if hooks.metrics_log is not None:
            line = {"step": done, "loss": loss, "step_s": round(step_s, 4)}
            _append_jsonl(hooks.metrics_log, line | (hooks.metrics() if hooks.metrics else {}))
        if checkpoint_root is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            extra = {"losses": history.losses, "evals": history.evals}
            save_checkpoint(checkpoint_root, done, prefix, optimizer, scheduler, extra)
    return history


def _accumulate(prefix: Prefix, loss_fn: LossFn, batches: Iterator[Batch], micro_batches: int) -> float:
    """Gradients of the token-mean loss over `micro_batches` batches; returns that loss."""
    prefix.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for _ in range(micro_batches):
        loss_sum, n = loss_fn(next(batches), prefix())
        loss_sum.backward()  # summed now, divided by the token count of all micro-batches below
        total, count = total + loss_sum.item(), count + n
    for p in prefix.parameters():
        if p.grad is not None:
            p.grad /= max(count, 1)
    return total / max(count, 1)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def local_loss_fn(model: PreTrainedModel) -> LossFn:
    """Loss through a whole local model (the emulator, or the full model in the lab)."""

    head = Head(model)

    def loss_fn(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        hidden = hidden_with_prefix(model, batch.input_ids, batch.attention_mask, kv)  # (B, T, d), normed
        return supervised_loss_sum(head.logits, hidden, batch.labels)

    return loss_fn


def fit_prefix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    prefix_config: PrefixConfig,
    config: TrainConfig,
    max_length: int = 128,
    checkpoint_root: Path | None = None,
    desc: str = "train",
    hooks: StepHooks | None = None,
) -> tuple[Prefix, TrainHistory]:
    """Train a new prefix for `model` on `examples` through the local model. Returns it and its history."""
    prefix_config.check_fits(model.config)
    prefix = Prefix(prefix_config)
    encoded = encode_examples(tokenizer, examples, max_length)
    history = train_prefix(
        prefix, local_loss_fn(model), encoded, resolve_pad_id(tokenizer), config, checkpoint_root, desc, hooks
    )
    return prefix, history
