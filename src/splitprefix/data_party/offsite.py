"""Offsite prefix training on the emulator, and integration of the result into the full model's layout.

Both run at the data party with no network: the emulator is all it ever receives from the model party.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splitprefix.data.formats import Example, load_jsonl
from splitprefix.data_party.train import TrainConfig, fit_prefix
from splitprefix.errors import ConfigError
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.files import write_json
from splitprefix.model.emulator import DroppedLayers, EmulatorManifest, integrate_kv
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.runtime import RuntimeSettings

CHECKPOINT_DIR = "checkpoint"
RUN_FILE = "train_config.json"
EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class OffsiteConfig:
    """Everything that defines an offsite training run; saved next to the prefix."""

    prefix_len: int = 16
    """Virtual tokens P per layer."""
    projection_dim: int | None = None
    """Hidden width of the MLP reparameterisation; unset trains keys/values directly."""
    max_length: int = 128
    """Tokens kept per training example."""
    epochs: float | None = None
    """Passes over the data; when set, overrides the step count (`steps`)."""
    eval_fraction: float = 0.1
    """Share of the training file held out for evaluation when no separate eval file is given."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings."""

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0; got {self.epochs}")


def split_held_out(
    examples: list[Example], eval_fraction: float, eval_data: Path | None
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the examples of `eval_data` when given, else the last `eval_fraction` of `examples`."""
    if eval_data is not None:
        return examples, load_jsonl(eval_data)
    n_eval = int(len(examples) * eval_fraction)
    if n_eval == 0:
        return examples, []
    return examples[:-n_eval], examples[-n_eval:]


def steps_for(train: TrainConfig, epochs: float | None, n_train: int) -> TrainConfig:
    """`train` with its steps set from `epochs` passes over `n_train` examples (when given)."""
    steps = train.steps
    if epochs is not None:
        steps = max(1, math.ceil(epochs * n_train / train.batch_size))
    return TrainConfig(**{**asdict(train), "steps": steps})


def train_offsite(
    emulator_dir: Path,
    data: Path,
    out: Path,
    config: OffsiteConfig,
    eval_data: Path | None = None,
    runtime: RuntimeSettings = RuntimeSettings(),
) -> dict[str, Any]:
    """Train a prefix on the emulator, on `runtime`'s device and dtype (the prefix stays fp32);
    write it, its hyper-parameters and its held-out evaluation to `out`."""
    manifest = EmulatorManifest.load(emulator_dir)
    model = load_causal_lm(emulator_dir, runtime.torch_dtype, device=runtime.device)
    tokenizer = load_tokenizer(emulator_dir)
    train, held_out = split_held_out(load_jsonl(data), config.eval_fraction, eval_data)
    train_config = steps_for(config.train, config.epochs, len(train))
    steps = train_config.steps
    prefix_config = PrefixConfig.for_model(
        model.config, config.prefix_len, projection_dim=config.projection_dim
    )
    start = time.perf_counter()
    prefix, history = fit_prefix(
        model,
        tokenizer,
        train,
        prefix_config,
        train_config,
        config.max_length,
        out / CHECKPOINT_DIR,
        "offsite",
    )
    report: dict[str, Any] = {
        "n_train": len(train),
        "steps": steps,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    report["final_train_loss"] = history.losses[-1]
    if held_out:
        report["held_out"] = evaluate(model, tokenizer, held_out, prefix().detach(), EvalConfig())
    prefix.save(out)
    write_json(
        out / RUN_FILE,
        {
            "layout": "emulator",
            "emulator": str(emulator_dir),
            "base_model": manifest.base_model,
            "data": str(data),
            "config": asdict(config),
            "runtime": asdict(runtime),
            "effective_steps": steps,
        },
    )
    write_json(out / EVAL_FILE, report)
    write_json(out / "train_losses.json", history.losses)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return report


def integrate(prefix_dir: Path, emulator_dir: Path, out: Path, dropped: DroppedLayers = "auto") -> Prefix:
    """Map an emulator-layout prefix onto every layer of the full model and save it to `out`."""
    manifest = EmulatorManifest.load(emulator_dir)
    prefix = Prefix.load(prefix_dir).fold()
    full_kv = integrate_kv(prefix().detach(), manifest, dropped)
    layers_kv = prefix.config.layers_kv
    full = Prefix(
        PrefixConfig(
            manifest.num_layers,
            prefix.config.num_kv_heads,
            prefix.config.head_dim,
            prefix.config.num_virtual_tokens,
            layers_kv=None if layers_kv is None else tuple(layers_kv[i] for i in manifest.layer_map),
        ),
        full_kv,
    )
    full.save(out)
    write_json(
        out / RUN_FILE,
        {
            "layout": "full",
            "base_model": manifest.base_model,
            "integrated_from": str(prefix_dir),
            "emulator": str(emulator_dir),
            "dropped": dropped,
            "layer_map": manifest.layer_map,
        },
    )
    return full
