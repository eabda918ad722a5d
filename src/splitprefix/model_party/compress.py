"""Building the emulator: uniform layer drop above K, then optional distillation of the kept layers.

Distillation trains only the kept upper layers so that the emulator's final hidden states (after the
final norm) and/or its logits match the full model's on a general corpus, in the spirit of
Offsite-Tuning's non-linear knowledge distillation. The bottom, norm and head never change.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from splitprefix.errors import ConfigError
from splitprefix.model.emulator import (
    EmulatorManifest,
    bottom_fingerprint,
    config_fingerprint,
    stand_ins,
    tokenizer_fingerprint,
    uniform_keep,
)
from splitprefix.model.registry import architecture_of, config_keeping_layers
from splitprefix.model.split import Activations, Bottom, Head, LayerStack

CHECKPOINT_DIR = "checkpoint"


def build_emulator(model: PreTrainedModel, split_at: int, keep: int) -> tuple[PreTrainedModel, list[int]]:
    """A copy of `model` with layers [0, K) and N uniformly chosen upper layers. Returns (emulator, kept)."""
    num_layers = model.config.num_hidden_layers
    kept = list(range(split_at)) + uniform_keep(num_layers, split_at, keep)
    config = config_keeping_layers(model.config, kept)
    emulator = AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation)
    emulator.load_state_dict(_renumber_layers(model, kept), strict=True)
    emulator.requires_grad_(False)
    return emulator.to(model.dtype).eval(), kept


def _renumber_layers(model: PreTrainedModel, kept: list[int]) -> dict[str, torch.Tensor]:
    arch = architecture_of(model.config)
    layers = f"{arch.backbone}.{arch.layers}."
    renamed = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(layers):
            renamed[name] = tensor
            continue
        index, rest = name[len(layers) :].split(".", 1)
        if int(index) in kept:
            renamed[f"{layers}{kept.index(int(index))}.{rest}"] = tensor
    return renamed


def make_manifest(
    base_model: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    split_at: int,
    kept: list[int],
) -> EmulatorManifest:
    num_layers = model.config.num_hidden_layers
    return EmulatorManifest(
        base_model=base_model,
        base_config_sha256=config_fingerprint(model),
        num_layers=num_layers,
        split_at=split_at,
        kept_layers=kept,
        layer_map=stand_ins(num_layers, split_at, kept[split_at:]),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        bottom_sha256=bottom_fingerprint(model, split_at),
    )


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the model party's distillation of the kept upper layers."""

    steps: int = 200
    """Optimiser steps."""
    lr: float = 3e-4
    """AdamW learning rate (constant after a short warm-up)."""
    batch_size: int = 16
    """Blocks per step."""
    loss: Literal["hidden", "logits", "both"] = "hidden"
    """Match final hidden states (MSE), logits (KL), or the sum of both."""
    eval_blocks: int = 64
    """Held-out blocks for the perplexity gap, taken from the end of the corpus."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints; 0 disables them."""
    seed: int = 0
    """Seed of the block order."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_blocks < 1:
            raise ConfigError(
                f"steps, batch_size and eval_blocks must be >= 1; got {self.steps}, {self.batch_size}, {self.eval_blocks}"
            )
        if self.loss not in ("hidden", "logits", "both"):
            raise ConfigError(f"loss must be 'hidden', 'logits' or 'both'; got {self.loss!r}")


class _Distiller:
    """Teacher and student views that share the frozen bottom activations."""

    def __init__(self, full: PreTrainedModel, emulator: PreTrainedModel, split_at: int) -> None:
        self.bottom = Bottom(full, split_at)
        self.teacher, self.teacher_head = (
            LayerStack(full, split_at, full.config.num_hidden_layers),
            Head(full),
        )
        self.student = LayerStack(emulator, split_at, emulator.config.num_hidden_layers)
        self.student_head = Head(emulator)

    def loss(self, blocks: torch.Tensor, kind: str) -> torch.Tensor:
        mask = torch.ones_like(blocks)
        positions = torch.arange(blocks.shape[1]).expand_as(blocks)
        with torch.no_grad():
            x = self.bottom(blocks, mask, positions)
            teacher = self.teacher_head.norm(self.teacher(x))  # (B, T, d)
        student = self.student_head.norm(self.student(Activations(x.hidden, mask, positions)))
        total = torch.zeros(())
        if kind in ("hidden", "both"):
            total = total + F.mse_loss(student, teacher)
        if kind in ("logits", "both"):
            t_logp = F.log_softmax(self.teacher_head.logits(teacher), -1)
            s_logp = F.log_softmax(self.student_head.logits(student), -1)
            total = total + F.kl_div(
                s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean"
            )
        return total


@torch.no_grad()
def lm_perplexity(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Perplexity of `model` on packed token blocks (N, T)."""
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    return float(torch.exp(torch.tensor(total / len(blocks))))


def distill(
    full: PreTrainedModel,
    emulator: PreTrainedModel,
    split_at: int,
    blocks: torch.Tensor,
    config: DistillConfig,
    checkpoint_root: Path | None = None,
) -> dict[str, Any]:
    """Train the emulator's kept upper layers in place; returns settings and the perplexity gap before/after."""
    if len(blocks) <= config.eval_blocks:
        raise ConfigError(
            f"the corpus has {len(blocks)} blocks; need more than eval_blocks={config.eval_blocks}"
        )
    train, held_out = blocks[: -config.eval_blocks], blocks[-config.eval_blocks :]
    full_ppl, before = lm_perplexity(full, held_out), lm_perplexity(emulator, held_out)
    upper = torch.nn.ModuleList(architecture_of(emulator.config).layers_of(emulator)[split_at:])
    upper.requires_grad_(True)
    optimizer = torch.optim.AdamW(upper.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    step = 0
    if checkpoint_root is not None:
        check_resumable(checkpoint_root, {**asdict(config), "split_at": split_at})
        step, _ = load_checkpoint(checkpoint_root, upper, optimizer, scheduler)
    distiller = _Distiller(full, emulator, split_at)
    start = time.perf_counter()
    bar = tqdm(range(step, config.steps), desc="distill", initial=step, total=config.steps, disable=None)
    for step in bar:
        # Blocks are a pure function of (seed, step), so a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        batch = train[torch.randint(len(train), (config.batch_size,), generator=generator)]
        loss = distiller.loss(batch, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(upper.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if checkpoint_root is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(checkpoint_root, done, upper, optimizer, scheduler)
    upper.requires_grad_(False)
    emulator.eval()
    return {
        "config": asdict(config),
        "train_blocks": len(train),
        "full_perplexity": full_ppl,
        "emulator_perplexity_before": before,
        "emulator_perplexity_after": lm_perplexity(emulator, held_out),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def corpus_blocks(tokenizer: PreTrainedTokenizerBase, data: Path, block_size: int = 128) -> torch.Tensor:
    """A JSONL corpus (any supported record format) packed into token blocks (N, block_size)."""
    from splitprefix.data.formats import load_jsonl
    from splitprefix.model_party.pretrain import pack_blocks

    documents = [e.prompt + e.completion for e in load_jsonl(data)]
    return pack_blocks(tokenizer, documents, block_size)  # type: ignore[arg-type]


def emulate(
    model_dir: str,
    split_at: int,
    keep: int,
    out: Path,
    distill_data: Path | None = None,
    distill_config: DistillConfig = DistillConfig(),
) -> EmulatorManifest:
    """Build an emulator of `model_dir` in `out`: a model directory plus `emulator_manifest.json`."""
    from splitprefix.model.loading import load_causal_lm, load_tokenizer, resolve_model_dir

    full, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    storage_dtype = _storage_dtype(resolve_model_dir(model_dir))
    emulator, kept = build_emulator(full, split_at, keep)
    manifest = make_manifest(str(model_dir), full, tokenizer, split_at, kept)
    if distill_data is not None:
        blocks = corpus_blocks(tokenizer, distill_data)
        manifest.distillation = distill(
            full, emulator, split_at, blocks, distill_config, out / CHECKPOINT_DIR
        )
    out.mkdir(parents=True, exist_ok=True)
    emulator.to(storage_dtype).save_pretrained(out)  # type: ignore[arg-type]
    tokenizer.save_pretrained(out)
    manifest.save(out)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return manifest


def _storage_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the model's weights are stored in, so the emulator's kept layers stay bit-identical."""
    import json

    raw = json.loads((model_dir / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return getattr(torch, name)
