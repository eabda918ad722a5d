"""Prefix training through the split model (`train_split`): a `SplitSession`'s loss, checkpoints,
held-out evaluation and the saved run.

The prefix always covers all L layers of the full model, so the result plugs into the whole model
(`splitprefix eval MODEL_DIR --prefix`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitprefix.data.batching import encode_examples, resolve_pad_id
from splitprefix.data.formats import load_jsonl
from splitprefix.data_party.accounting import run_privacy
from splitprefix.data_party.generate import split_scorer
from splitprefix.data_party.gradient_noise import GradientNoise, GradientNoiser
from splitprefix.data_party.offsite import split_held_out, steps_for
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import SplitSession, open_split
from splitprefix.data_party.train import StepHooks, TrainConfig, train_prefix
from splitprefix.errors import ConfigError
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.files import write_json
from splitprefix.model.prefix import Prefix
from splitprefix.runtime import RuntimeSettings

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "train_config.json"
EVAL_FILE = "eval.json"
DEFAULT_PREFIX_LEN = 16


@dataclass(frozen=True)
class SplitTrainConfig:
    """Everything that defines a split training run; saved next to the prefix."""

    prefix_len: int | None = None
    """Virtual tokens P per layer; unset: the `init` prefix's, else 16."""
    init: Path | None = None
    """Full-layout prefix to start from (e.g. from `splitprefix integrate`); unset = random."""
    max_length: int = 128
    """Tokens kept per training example."""
    epochs: float | None = None
    """Passes over the data; when set, overrides the step count (`steps`)."""
    eval_fraction: float = 0.1
    """Share of the training file held out for evaluation when no `eval_data` is given."""
    eval_data: Path | None = None
    """Held-out JSONL file; unset: a slice (`eval_fraction`) of the training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings."""
    privacy: PrivacyConfig | None = None
    """Clipping and noise on the layer-K states sent to the server; None = off."""
    exact_match: bool = True
    """Score exact match on the held-out prompts at the end (batched, KV-cached split generation)."""
    grad_noise: float = 0.0
    """rho (head=client): noise of rho x each row's RMS gradient norm on the gradient sent back,
    against the model party's label inversion (measured by `privacy-audit --grad-noise`); 0 = off."""

    def __post_init__(self) -> None:
        if self.prefix_len is not None and self.prefix_len < 1:
            raise ConfigError(f"prefix_len must be >= 1; got {self.prefix_len}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0; got {self.epochs}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2; got {self.max_length}")


def initial_prefix(session: SplitSession, config: SplitTrainConfig) -> Prefix:
    """The --init prefix (checked against the server's model), or a seeded random one."""
    if config.init is None:
        with torch.random.fork_rng():  # reproducible without touching the caller's RNG
            torch.manual_seed(config.train.seed)
            return Prefix(session.prefix_config(config.prefix_len or DEFAULT_PREFIX_LEN))
    prefix = Prefix.load(config.init).fold()
    session.check_prefix(prefix, f"the --init prefix {config.init}")
    p = prefix.config.num_virtual_tokens
    if config.prefix_len is not None and config.prefix_len != p:
        raise ConfigError(
            f"prefix_len {config.prefix_len} conflicts with the --init prefix's {p} virtual tokens"
        )
    return prefix


class _Meter:
    """Per-step traffic for the metrics log, with evaluation traffic kept apart from training's."""

    def __init__(self, session: SplitSession, held_out: list, max_length: int) -> None:
        self.session, self.held_out = session, held_out
        self.eval_config = EvalConfig(max_length=max_length, exact_match=False)
        self.last = session.client.traffic.snapshot()
        self.eval_report: dict[str, Any] = {}

    def evaluate(self, prefix: Prefix) -> dict[str, Any]:
        if not self.held_out:
            return {}
        before = self.session.client.traffic.snapshot()
        s = self.session
        report = evaluate(split_scorer(s), s.tokenizer, self.held_out, prefix().detach(), self.eval_config)
        after = s.client.traffic.snapshot()
        self.eval_report = {"eval_loss": report["loss"]}
        self.last = {k: self.last[k] + after[k] - before[k] for k in after}  # not the step's traffic
        return report

    def metrics(self) -> dict[str, Any]:
        now = self.session.client.traffic.snapshot()
        line = {k: now[k] - self.last[k] for k in ("bytes_sent", "bytes_received", "retries", "recomputes")}
        self.last, report, self.eval_report = now, self.eval_report, {}
        return line | report


def train_split(
    emulator_dir: Path,
    settings: ClientSettings,
    data: Path,
    out: Path,
    config: SplitTrainConfig,
    runtime: RuntimeSettings = RuntimeSettings(),
) -> dict[str, Any]:
    """Train a full-layout prefix through the server; write it, its settings and its evaluation to `out`.

    Rerunning an interrupted job with the same `out` resumes from its last checkpoint.
    """
    session = open_split(emulator_dir, settings, config.privacy, runtime)
    if config.grad_noise:
        if settings.head != "client":
            session.close()
            raise ConfigError("grad_noise noises the gradient head=client sends back: use head=client")
        session.grad_noise = GradientNoiser(GradientNoise(config.grad_noise))
    try:
        return _train(session, emulator_dir, settings, data, out, config, runtime)
    finally:
        session.close()


def _train(
    session: SplitSession,
    emulator_dir: Path,
    settings: ClientSettings,
    data: Path,
    out: Path,
    config: SplitTrainConfig,
    runtime: RuntimeSettings,
) -> dict[str, Any]:
    train, held_out = split_held_out(load_jsonl(data), config.eval_fraction, config.eval_data)
    train_config = steps_for(config.train, config.epochs, len(train))
    prefix = initial_prefix(session, config)
    encoded = encode_examples(session.tokenizer, train, config.max_length)
    if not (out / CHECKPOINT_DIR).exists():
        (out / METRICS_FILE).unlink(missing_ok=True)  # a fresh run: drop the log of an older one
    meter = _Meter(session, held_out, config.max_length)
    hooks = StepHooks(
        evaluate=meter.evaluate if held_out else None, metrics=meter.metrics, metrics_log=out / METRICS_FILE
    )
    start = time.perf_counter()
    history = train_prefix(
        prefix,
        session.loss_fn(),
        encoded,
        resolve_pad_id(session.tokenizer),
        train_config,
        out / CHECKPOINT_DIR,
        f"split ({settings.head} head)",
        hooks,
    )
    report: dict[str, Any] = {
        "n_train": len(train),
        "steps": train_config.steps,
        "wall_s": round(time.perf_counter() - start, 1),
        "final_train_loss": history.losses[-1],
        "evals": [{k: v for k, v in e.items() if k != "samples"} for e in history.evals],
        "traffic": session.client.traffic.snapshot(),
    }
    if held_out:
        eval_config = EvalConfig(max_length=config.max_length, exact_match=config.exact_match)
        began = time.perf_counter()
        report["held_out"] = evaluate(
            split_scorer(session), session.tokenizer, held_out, prefix().detach(), eval_config
        )
        report["held_out"]["wall_s"] = round(time.perf_counter() - began, 2)
    spent = run_privacy(session.tokenizer, encoded, held_out, config, train_config, len(history.evals))
    if spent is not None:
        report["privacy"] = spent
        logger.info("privacy of the states sent: epsilon %s at delta %s", spent["epsilon"], spent["delta"])
    prefix.save(out)
    record = _run_record(session, emulator_dir, settings, data, config, train_config)
    write_json(out / RUN_FILE, record | {"runtime": asdict(runtime)} | ({"privacy": spent} if spent else {}))
    write_json(out / EVAL_FILE, report)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return report


def _run_record(
    session: SplitSession,
    emulator_dir: Path,
    settings: ClientSettings,
    data: Path,
    config: SplitTrainConfig,
    train_config: TrainConfig,
) -> dict[str, Any]:
    client = {k: v for k, v in asdict(settings).items() if k != "token"}  # never write the secret
    return {
        "layout": "full",
        "base_model": session.manifest.base_model,
        "emulator": str(emulator_dir),
        "split_at": session.split_at,
        "num_layers": session.info.num_layers,
        "data": str(data),
        "client": client,
        "config": asdict(config),
        "effective_steps": train_config.steps,
    }
