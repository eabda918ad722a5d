"""The full model as the teacher of distillation: its final normed hidden states on token blocks.

Distillation trains the emulator's kept upper layers to match them. `LoadedTeacher` runs a model
already in memory. `StreamedTeacher` never holds the full model: it runs the emulator's bottom
(bit-identical to the full model's), then reads the full model's layers [K, L) from the checkpoint
one at a time, runs each over every block asked for, and drops it, so that it holds one fp32
layer and the blocks' hidden states, never the whole model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from splitprefix.model.partial_load import CheckpointReader, drop, materialise, meta_model
from splitprefix.model.prefix import prefix_cache
from splitprefix.model.split import Activations, Bottom, Head, LayerStack, extend_mask


class Teacher(Protocol):
    """What distillation asks of the full model."""

    def targets(
        self, blocks: torch.Tensor, batch_size: int, prefixes: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Final hidden states after the final norm of token blocks (N, T), computed `batch_size`
        rows at a time: (N, T, d), no grad. With `prefixes`, the i-th batch of rows runs with
        `prefixes[i]` (L, 2, n_kv, P, hd) as its deep prefix."""
        ...

    def perplexity(self, blocks: torch.Tensor) -> float:
        """The full model's perplexity on token blocks (N, T)."""
        ...


def _inputs(blocks: torch.Tensor, prefix_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask (N, P + T) and positions (N, T) of unpadded blocks behind a P-token prefix."""
    mask = extend_mask(torch.ones_like(blocks), prefix_len)
    return mask, torch.arange(prefix_len, prefix_len + blocks.shape[1]).expand_as(blocks)


def _cache(kv: torch.Tensor | None, config: PretrainedConfig, batch: int, first: int) -> DynamicCache | None:
    return None if kv is None else prefix_cache(kv, config, batch, first_layer=first)


def _prefix_len(prefixes: list[torch.Tensor] | None) -> int:
    return 0 if not prefixes else prefixes[0].shape[3]


PERPLEXITY_BATCH = 16
"""Blocks per forward when measuring perplexity."""


@torch.no_grad()
def lm_perplexity(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = PERPLEXITY_BATCH) -> float:
    """Perplexity of `model` on packed token blocks (N, T)."""
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    return float(torch.exp(torch.tensor(total / len(blocks))))


@torch.no_grad()
def perplexity_of(
    head: Head, hidden: torch.Tensor, blocks: torch.Tensor, batch_size: int = PERPLEXITY_BATCH
) -> float:
    """Perplexity of next-token prediction from normed final hidden states (N, T, d) of blocks (N, T)."""
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        logits = head.logits(hidden[start : start + batch_size]).float()  # (B, T, V)
        batch = blocks[start : start + batch_size]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        total += float(loss) * len(batch)
    return float(torch.exp(torch.tensor(total / len(blocks))))


class LoadedTeacher:
    """A full model already in memory."""

    def __init__(self, full: PreTrainedModel, split_at: int) -> None:
        self.full = full
        self.bottom = Bottom(full, split_at)
        self.upper = LayerStack(full, split_at, full.config.num_hidden_layers)
        self.head = Head(full)

    @torch.no_grad()
    def targets(
        self, blocks: torch.Tensor, batch_size: int, prefixes: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        out = []
        config, k = self.full.config, self.upper.start
        for i, batch in enumerate(blocks.split(batch_size)):
            mask, positions = _inputs(batch, _prefix_len(prefixes))
            kv = None if prefixes is None else prefixes[i]
            x = self.bottom(
                batch, mask, positions, _cache(None if kv is None else kv[:k], config, len(batch), 0)
            )
            hidden = self.upper(x, _cache(None if kv is None else kv[k:], config, len(batch), k))
            out.append(self.head.norm(hidden))  # (B, T, d)
        return torch.cat(out)

    def perplexity(self, blocks: torch.Tensor) -> float:
        return lm_perplexity(self.full, blocks)


class StreamedTeacher:
    """The full model whose checkpoint `reader` reads, one upper layer in memory at a time.

    `bottom` and `head` are the emulator's, which equal the full model's bit for bit and which
    distillation never trains.
    """

    def __init__(
        self,
        reader: CheckpointReader,
        config: PretrainedConfig,
        bottom: Bottom,
        head: Head,
        split_at: int,
    ) -> None:
        self.reader, self.skeleton = reader, meta_model(config)
        self.bottom, self.head, self.split_at = bottom, head, split_at

    @torch.no_grad()
    def targets(
        self, blocks: torch.Tensor, batch_size: int, prefixes: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        mask, positions = _inputs(blocks, _prefix_len(prefixes))
        rows = [slice(start, start + batch_size) for start in range(0, len(blocks), batch_size)]
        config, k = self.skeleton.config, self.split_at

        def cache(i: int, first: int, stop: int) -> DynamicCache | None:
            rows_i = rows[i].stop - rows[i].start
            return None if prefixes is None else _cache(prefixes[i][first:stop], config, rows_i, first)

        hidden = torch.cat(
            [self.bottom(blocks[r], mask[r], positions[r], cache(i, 0, k)).hidden for i, r in enumerate(rows)]
        )  # (N, T, d)
        for layer in range(k, config.num_hidden_layers):
            stack = LayerStack(self.skeleton, layer, layer + 1)
            materialise(self.skeleton, self.reader, [stack], torch.float32, "cpu")
            for i, r in enumerate(rows):  # each batch as the whole model would run it
                hidden[r] = stack(Activations(hidden[r], mask[r], positions[r]), cache(i, layer, layer + 1))
            _drop_layers(stack)
        for r in rows:
            hidden[r] = self.head.norm(hidden[r])
        return hidden

    def perplexity(self, blocks: torch.Tensor) -> float:
        return perplexity_of(self.head, self.targets(blocks, PERPLEXITY_BATCH), blocks, PERPLEXITY_BATCH)


def _drop_layers(stack: LayerStack) -> None:
    module: nn.Module
    for module in stack.layers:
        drop(module)
