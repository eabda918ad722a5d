"""Building the emulator: uniform layer drop above K, then optional distillation of the kept layers.

Distillation trains only the kept upper layers so that the emulator's final hidden states (after the
final norm) and/or its logits match the full model's on a general corpus, in the spirit of
Offsite-Tuning's non-linear knowledge distillation. The bottom, norm and head never change.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from splitprefix.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from splitprefix.errors import ConfigError
from splitprefix.model.emulator import (
    EmulatorManifest,
    bottom_fingerprint,
    config_fingerprint,
    stand_ins,
    stored_bottom_fingerprint,
    tokenizer_fingerprint,
    top_fingerprint,
    uniform_keep,
)
from splitprefix.model.loading import checkpoint_dtype, load_tokenizer, resolve_model_dir
from splitprefix.model.partial_load import CheckpointReader, materialise, meta_model, open_checkpoint
from splitprefix.model.prefix import PrefixConfig, prefix_cache
from splitprefix.model.registry import architecture_of, config_keeping_layers
from splitprefix.model.split import Bottom, Head, LayerStack, extend_mask
from splitprefix.model_party.teacher import StreamedTeacher, Teacher, lm_perplexity
from splitprefix.progress import Progress

CHECKPOINT_DIR = "checkpoint"


def kept_layers(config: PretrainedConfig, split_at: int, keep: int, client_layers: int = 0) -> list[int]:
    """Original indices of the emulator's layers: [0, K), then N upper layers by uniform layer drop.

    With M = `client_layers`, the last M of the N are the full model's last M layers (for the
    U-shaped split) and the other N - M are dropped uniformly from [K, L - M)."""
    num_layers = config.num_hidden_layers
    if client_layers and not 0 < client_layers < keep:
        raise ConfigError(
            f"client_layers M must satisfy 0 <= M < N = {keep} (the emulator also needs a stand-in for "
            f"the server's layers); got M={client_layers}"
        )
    middle = uniform_keep(num_layers - client_layers, split_at, keep - client_layers)
    return list(range(split_at)) + middle + list(range(num_layers - client_layers, num_layers))


def build_emulator(
    model: PreTrainedModel, split_at: int, keep: int, client_layers: int = 0
) -> tuple[PreTrainedModel, list[int]]:
    """A copy of the loaded `model` with layers [0, K) and N uniformly chosen upper layers (the last
    `client_layers` of them the model's last ones).

    Returns (emulator, kept). `emulate` streams the same emulator from the checkpoint instead.
    """
    kept = kept_layers(model.config, split_at, keep, client_layers)
    emulator = AutoModelForCausalLM.from_config(
        config_keeping_layers(model.config, kept), attn_implementation=model.config._attn_implementation
    )
    source = _original_name(model.config, kept)
    originals = model.state_dict()
    emulator.load_state_dict({name: originals[source(name)] for name in emulator.state_dict()}, strict=True)
    emulator.requires_grad_(False)
    return emulator.to(model.dtype).eval(), kept


def stream_emulator(
    reader: CheckpointReader, config: PretrainedConfig, kept: list[int], trainable: bool = False
) -> PreTrainedModel:
    """The emulator keeping original layers `kept` of the model `config` describes, each tensor read
    from its checkpoint through `reader`; the full model is never built.

    The tensors keep their stored dtype, or are fp32 copies of their own with `trainable` (for
    distillation, which must not write into the memory-mapped file the teacher reads).
    """
    emulator = meta_model(config_keeping_layers(config, kept))
    dtype = torch.float32 if trainable else None
    source = _original_name(config, kept)
    materialise(emulator, reader, [emulator], dtype, "cpu", source=source, copy=trainable)
    return emulator


def _original_name(config: PretrainedConfig, kept: list[int]) -> Callable[[str], str]:
    """Maps an emulator tensor's name to the name of the original tensor it copies."""
    arch = architecture_of(config)
    layers = f"{arch.backbone}.{arch.layers}."

    def source(name: str) -> str:
        if not name.startswith(layers):
            return name
        index, rest = name[len(layers) :].split(".", 1)
        return f"{layers}{kept[int(index)]}.{rest}"

    return source


def make_manifest(
    base_model: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    split_at: int,
    kept: list[int],
    bottom_sha256: str | None = None,
    top_sha256: dict[str, str] | None = None,
) -> EmulatorManifest:
    """The manifest of an emulator of `model` (which may be a meta skeleton when `bottom_sha256`,
    hashed from its checkpoint, is given)."""
    num_layers = model.config.num_hidden_layers
    return EmulatorManifest(
        base_model=base_model,
        base_config_sha256=config_fingerprint(model),
        num_layers=num_layers,
        split_at=split_at,
        kept_layers=kept,
        layer_map=stand_ins(num_layers, split_at, kept[split_at:]),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        bottom_sha256=bottom_sha256 or bottom_fingerprint(model, split_at),
        client_layers=len(top_sha256 or {}),
        top_sha256=top_sha256 or {},
    )


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the model party's distillation of the kept upper layers."""

    steps: int = 100
    """Distillation steps."""
    lr: float = 1e-3
    """AdamW learning rate (constant after a short warm-up)."""
    batch_size: int = 16
    """Blocks per step."""
    loss: Literal["hidden", "logits", "both"] = "both"
    """Match final hidden states (MSE), logits (KL), or the sum of both."""
    eval_blocks: int = 64
    """Held-out blocks for the perplexity gap, taken from the end of the corpus."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints; 0 disables them."""
    seed: int = 0
    """Seed of the block order."""
    teacher_memory_mb: float = 256.0
    """Teacher targets held at once (fp32 hidden states of a chunk of steps); each layer of a
    streamed teacher is read once per chunk."""
    prefix_len: int = 0
    """Prefix-aware distillation: virtual tokens of a random deep prefix attached at every step to
    the student (emulator layout) and to the teacher (mapped onto all L layers, each dropped layer
    taking its stand-in's), so that the emulator learns to respond to a prefix as the full model
    does; 0 distils without prefixes (on real text both carried the same share of the gain)."""
    prefix_std: float = 1.0
    """Standard deviation of the random prefixes' keys and values (a new prefix's initial scale)."""
    corpus_chars: int | None = 3_000_000
    """Characters of the built-in model's pretraining corpus distilled on (a seeded subset, when
    that corpus is the one chosen); None = all of it."""

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.eval_blocks) < 1 or self.teacher_memory_mb <= 0:
            raise ConfigError(
                "steps, batch_size and eval_blocks must be >= 1 and teacher_memory_mb > 0; got "
                f"{self.steps}, {self.batch_size}, {self.eval_blocks}, {self.teacher_memory_mb}"
            )
        if self.corpus_chars is not None and self.corpus_chars < 1:
            raise ConfigError(f"corpus_chars must be >= 1 or None; got {self.corpus_chars}")
        if self.prefix_len < 0 or not self.prefix_std > 0:
            raise ConfigError(
                f"prefix_len must be >= 0 and prefix_std > 0; got {self.prefix_len}, {self.prefix_std}"
            )
        if self.loss not in ("hidden", "logits", "both"):
            raise ConfigError(f"loss must be 'hidden', 'logits' or 'both'; got {self.loss!r}")


class _Distiller:
    """The student: the emulator's upper layers on its frozen bottom's activations."""

    def __init__(self, emulator: PreTrainedModel, split_at: int) -> None:
        self.bottom = Bottom(emulator, split_at)
        self.student = LayerStack(emulator, split_at, emulator.config.num_hidden_layers)
        self.head = Head(emulator)

    def loss(
        self, blocks: torch.Tensor, teacher: torch.Tensor, kind: str, kv: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distillation loss of the student on `blocks` (B, T) against the teacher's normed final
        hidden states (B, T, d), with `kv` (K + N, 2, n_kv, P, hd) as the student's prefix if given."""
        p, batch, config, k = (
            0 if kv is None else kv.shape[3],
            len(blocks),
            self.student.config,
            self.student.start,
        )
        mask = extend_mask(torch.ones_like(blocks), p)
        positions = torch.arange(p, p + blocks.shape[1]).expand_as(blocks)
        with torch.no_grad():
            x = self.bottom(
                blocks, mask, positions, None if kv is None else prefix_cache(kv[:k], config, batch)
            )
        cache = None if kv is None else prefix_cache(kv[k:], config, batch, first_layer=k)
        student = self.head.norm(self.student(x, cache))  # (B, T, d)
        total = torch.zeros(())
        if kind in ("hidden", "both"):
            total = total + F.mse_loss(student, teacher)
        if kind in ("logits", "both"):
            # the emulator's head is the full model's, bit for bit; `logits` applies the family's transform
            t_logp = F.log_softmax(self.head.logits(teacher), -1)
            s_logp = F.log_softmax(self.head.logits(student), -1)
            total = total + F.kl_div(
                s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean"
            )
        return total


class _Batches:
    """Each step's blocks and teacher targets. The targets are computed a chunk of steps at a time,
    so that a streamed teacher reads each of its layers once per chunk, not once per step."""

    def __init__(
        self,
        teacher: Teacher,
        train: torch.Tensor,
        config: DistillConfig,
        emulator: PretrainedConfig,
        layer_map: list[int] | None,
    ) -> None:
        self.teacher, self.train, self.config = teacher, train, config
        per_step = config.batch_size * train.shape[1] * emulator.hidden_size * 4  # fp32 targets of one step
        self.chunk = max(1, int(config.teacher_memory_mb * 2**20 // per_step))
        self.ready: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.kv_shape = PrefixConfig.for_model(emulator, max(1, config.prefix_len)).kv_shape
        self.layer_map = layer_map

    def blocks(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks (B, T) of `step` and its emulator-layout prefix (None without prefixes)."""
        # A pure function of (seed, step), so that a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        blocks = self.train[torch.randint(len(self.train), (self.config.batch_size,), generator=generator)]
        if not self.config.prefix_len:
            return blocks, None
        return blocks, torch.randn(self.kv_shape, generator=generator) * self.config.prefix_std

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(blocks (B, T), teacher targets (B, T, d), student prefix or None) of `step`."""
        if step not in self.ready:
            steps = range(step, min(step + self.chunk, self.config.steps))
            drawn = [self.blocks(s) for s in steps]
            kvs = [kv for _, kv in drawn if kv is not None]
            full = [kv[self.layer_map] for kv in kvs] if kvs and self.layer_map else None
            targets = self.teacher.targets(torch.cat([b for b, _ in drawn]), self.config.batch_size, full)
            self.ready = {
                s: (b, t, kv)
                for s, (b, kv), t in zip(steps, drawn, targets.split(self.config.batch_size), strict=True)
            }
        return self.ready.pop(step)


def distill(
    teacher: Teacher,
    emulator: PreTrainedModel,
    split_at: int,
    blocks: torch.Tensor,
    config: DistillConfig,
    checkpoint_root: Path | None = None,
    client_layers: int = 0,
    layer_map: list[int] | None = None,
) -> dict[str, Any]:
    """Train the emulator's kept upper layers in place to match `teacher`, the full model; returns
    settings and the perplexity gap before/after. The last `client_layers` stay the full model's.

    `layer_map` (the manifest's: each original layer's emulator layer) maps the random prefixes of
    prefix-aware distillation onto the teacher's layers; it is needed when `config.prefix_len` > 0."""
    if config.prefix_len and layer_map is None:
        raise ConfigError("prefix-aware distillation (prefix_len > 0) needs the emulator's layer_map")
    if len(blocks) <= config.eval_blocks:
        raise ConfigError(
            f"the corpus has {len(blocks)} blocks; need more than eval_blocks={config.eval_blocks}"
        )
    train, held_out = blocks[: -config.eval_blocks], blocks[-config.eval_blocks :]
    full_ppl, before = teacher.perplexity(held_out), lm_perplexity(emulator, held_out)
    layers = architecture_of(emulator.config).layers_of(emulator)
    upper = torch.nn.ModuleList(layers[split_at : len(layers) - client_layers])
    upper.requires_grad_(True)
    optimizer = torch.optim.AdamW(upper.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    step = 0
    if checkpoint_root is not None:
        check_resumable(checkpoint_root, {**asdict(config), "split_at": split_at})
        step, _ = load_checkpoint(checkpoint_root, upper, optimizer, scheduler)
    distiller, batches = (
        _Distiller(emulator, split_at),
        _Batches(teacher, train, config, emulator.config, layer_map),
    )
    start = time.perf_counter()
    bar = Progress(range(step, config.steps), "distill", total=config.steps, initial=step)
    for step in bar:
        blocks_, targets, kv = batches(step)
        loss = distiller.loss(blocks_, targets, config.loss, kv)
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


PRETRAINING_CORPUS = "pretraining"
"""`emulate`'s distillation corpus that stands for the built-in model's own pretraining corpus."""


def _pretraining_blocks(tokenizer: PreTrainedTokenizerBase, max_chars: int | None) -> torch.Tensor:
    # the builder of the shipped model is imported only when its corpus is asked for
    from splitprefix.pretraining.corpus import pretraining_blocks

    return pretraining_blocks(tokenizer, max_chars)


def corpus_blocks(tokenizer: PreTrainedTokenizerBase, data: Path, block_size: int = 128) -> torch.Tensor:
    """A JSONL corpus (any supported record format) packed into token blocks (N, block_size)."""
    from splitprefix.data.blocks import pack_blocks
    from splitprefix.data.formats import load_jsonl

    documents = [e.prompt + e.completion for e in load_jsonl(data)]
    return pack_blocks(tokenizer, documents, block_size)  # type: ignore[arg-type]


def emulate(
    model_dir: str,
    split_at: int,
    keep: int,
    out: Path,
    distill_data: Path | str | None = None,
    distill_config: DistillConfig = DistillConfig(),
    client_layers: int = 0,
) -> EmulatorManifest:
    """Build an emulator of `model_dir` in `out`: a model directory plus `emulator_manifest.json`.

    `distill_data` is the general corpus to distil on: a JSONL file, `PRETRAINING_CORPUS` for the
    built-in model's own pretraining text, or None for plain layer drop.

    With M = `client_layers`, its last M layers are the full model's, never distilled, so that a
    data party can keep them (the U-shaped split); the manifest records M and their fingerprints.

    The emulator's tensors are streamed from the checkpoint, and the bottom is hashed from it tensor
    by tensor, so layer drop holds no more than the emulator. Distillation trains the emulator in
    fp32 against the full model read one layer at a time (`StreamedTeacher`).
    """
    path = resolve_model_dir(model_dir)
    if Path(out).resolve() == path.resolve():  # the emulator's tensors view the model's file until saved
        raise ConfigError(f"--out {out} is the model's own directory; write the emulator elsewhere")
    config, tokenizer = AutoConfig.from_pretrained(path), load_tokenizer(path)
    storage_dtype = checkpoint_dtype(path)  # so the kept tensors stay bit-identical
    kept, full = kept_layers(config, split_at, keep, client_layers), meta_model(config)
    reader = open_checkpoint(path, full)
    bottom_sha256 = stored_bottom_fingerprint(reader, full, split_at)  # before the emulator is held
    emulator = stream_emulator(reader, config, kept, trainable=distill_data is not None)
    tops = {str(m): top_fingerprint(emulator, m) for m in range(1, client_layers + 1)}
    manifest = make_manifest(str(model_dir), full, tokenizer, split_at, kept, bottom_sha256, tops)
    if distill_data is not None:
        teacher = StreamedTeacher(reader, config, Bottom(emulator, split_at), Head(emulator), split_at)
        blocks = (
            _pretraining_blocks(tokenizer, distill_config.corpus_chars)
            if distill_data == PRETRAINING_CORPUS
            else corpus_blocks(tokenizer, Path(distill_data))
        )
        manifest.distillation = distill(
            teacher,
            emulator,
            split_at,
            blocks,
            distill_config,
            out / CHECKPOINT_DIR,
            client_layers,
            manifest.layer_map,
        )
    out.mkdir(parents=True, exist_ok=True)
    emulator.to(storage_dtype).save_pretrained(out)  # type: ignore[arg-type]
    tokenizer.save_pretrained(out)
    manifest.save(out)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return manifest
