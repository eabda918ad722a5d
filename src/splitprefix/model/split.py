"""Cutting a causal LM at layer K into views that share the loaded model's weights.

- `Bottom`: embeddings (plus learned positions) and layers [0, K). Run by the data party.
- `Top`: layers [K, L), and the final norm and LM head when the head stays on the server.
- `Head`: final norm and LM head, for the head-on-client cut.
- `ClientTop`: layers [L - M, L), norm and head, which the data party keeps in the U-shaped split.

Parts exchange `Activations`. Its attention mask covers every key the new tokens may attend to:
the prefix, earlier cached tokens, then the new tokens. A mask that covers only the new tokens
would run and silently give wrong numbers, so every part checks the length against its cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Cache, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.model.prefix import prefix_cache
from splitprefix.model.registry import SLIDING, Masks, PositionEmbeddings, architecture_of, scale_embeddings

HeadPlacement = Literal["server", "client"]


@dataclass
class Activations:
    """What one part hands to the next."""

    hidden: torch.Tensor
    """Hidden states, (B, T, d)."""
    attention_mask: torch.Tensor
    """1 for every visible key, 0 for padding: (B, S) with S = cached keys (prefix + past) + T."""
    positions: torch.Tensor
    """Position ids of the new tokens, (B, T)."""


def extend_mask(token_mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Prepend `prefix_len` always-visible keys to a (B, T) token mask. Returns (B, P + T)."""
    ones = token_mask.new_ones(token_mask.shape[0], prefix_len)
    return torch.cat([ones, token_mask], dim=1)


def token_positions(token_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them. (B, T)

    The first real token gets `offset` (the prefix length, as in PEFT's prefix tuning). Padding
    slots get `offset` too; they are masked out as keys, so their value never matters.
    """
    counts = token_mask.long().cumsum(dim=1) - 1
    return counts.clamp(min=0) + offset


def check_split_at(split_at: int, num_layers: int) -> None:
    """Raise unless 1 <= K < L, so that both parties run at least one layer."""
    if not isinstance(split_at, int) or not 1 <= split_at < num_layers:
        raise ConfigError(f"split_at must satisfy 1 <= K < L={num_layers}; got K={split_at!r}")


class Embeddings(nn.Module):
    """Token embeddings, plus learned positions and embedding dropout where the family has them."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        arch = architecture_of(model.config)
        self.config = model.config
        self.tokens = arch.part(model, arch.embed_tokens)
        self.positions = arch.optional_part(model, arch.embed_positions)
        self.dropout = arch.optional_part(model, arch.embed_dropout)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = scale_embeddings(self.config, self.tokens(input_ids))  # (B, T, d)
        if self.positions is not None:
            hidden = hidden + self.positions(positions)
        return hidden if self.dropout is None else self.dropout(hidden)


class LayerInputs(NamedTuple):
    """What every layer of a stack gets besides its hidden states and cache."""

    masks: Masks
    """The attention mask of each layer type."""
    positions: torch.Tensor
    """Position ids (B, T)."""
    extra: dict[str, Any]
    """Family-specific keywords (Falcon: `alibi`)."""
    rotary: dict[str, PositionEmbeddings] | None
    """Rotary (cos, sin) of each layer type; None for families without rotary embeddings."""


class LayerStack(nn.Module):
    """Decoder layers [start, stop) of a model, run exactly as the model's own forward runs them."""

    def __init__(self, model: PreTrainedModel, start: int, stop: int) -> None:
        super().__init__()
        self.arch = architecture_of(model.config)
        self.config = model.config
        self.start, self.stop = start, stop
        self.layers = nn.ModuleList(self.arch.layers_of(model)[start:stop])
        self.rotary = self.arch.optional_part(model, self.arch.rotary)
        self.layer_types = self.arch.layer_types(model.config)[start:stop]

    def forward(self, x: Activations, cache: Cache | None = None) -> torch.Tensor:
        """Run the layers on `x`, reading and extending `cache` for these layers. Returns (B, T, d)."""
        inputs = self._prepare(x, cache)
        hidden = x.hidden
        for i in range(len(self.layers)):
            hidden = self._call(i, hidden, inputs, cache)
        return hidden

    def forward_checkpointed(self, x: Activations, kv: torch.Tensor | None) -> torch.Tensor:
        """`forward` with `prefix_cache(kv)` as the cache, keeping for the backward only each layer's
        input, and recomputing inside the layer then (per-layer activation checkpointing): a graph
        then costs about B x T x d per layer. `kv` (stop - start, 2, n_kv, P, hd) or None. (B, T, d)

        Each layer gets a cache of its own prefix, built anew on the recompute, since a layer
        extends its cache in place.
        """
        batch = x.hidden.shape[0]
        sizing = None if kv is None else prefix_cache(kv.detach(), self.config, batch, self.start)
        inputs = self._prepare(x, sizing)
        hidden = x.hidden
        for i in range(len(self.layers)):
            run = partial(self._layer_with_prefix, i, inputs)
            args = (hidden,) if kv is None else (hidden, kv[i])
            hidden = checkpoint(run, *args, use_reentrant=False)
        return hidden

    def _layer_with_prefix(
        self, i: int, inputs: LayerInputs, hidden: torch.Tensor, *layer_kv: torch.Tensor
    ) -> torch.Tensor:
        """Layer `start + i` on `hidden`, with a fresh cache of its prefix `layer_kv` (none: no prefix)."""
        at = self.start + i
        cache = prefix_cache(layer_kv[0][None], self.config, hidden.shape[0], at) if layer_kv else None
        return self._call(i, hidden, inputs, cache)

    def _call(self, i: int, hidden: torch.Tensor, inputs: LayerInputs, cache: Cache | None) -> torch.Tensor:
        """Layer `start + i` on `hidden` (B, T, d), called as its family calls it. Returns (B, T, d)."""
        kind = self.layer_types[i]
        position = {} if inputs.rotary is None else {"position_embeddings": inputs.rotary[kind]}
        out = self.layers[i](
            hidden,
            attention_mask=inputs.masks[kind],
            position_ids=inputs.positions,
            **{self.arch.cache_keyword: cache},
            **position,
            **inputs.extra,
        )
        return self.arch.layer_output(out)

    def _prepare(self, x: Activations, cache: Cache | None) -> LayerInputs:
        """The attention mask of each kind of layer, the rotary embeddings and any extra layer inputs."""
        self._check_mask(x, cache)
        masks = {kind: self._mask(x, cache, kind) for kind in set(self.layer_types)}
        masks, extra = self.arch.layer_inputs(self.config, x.hidden, x.attention_mask, masks)
        rotary = None
        if self.rotary is not None:
            rotary = self.arch.rotary_embeddings(self.rotary, x.hidden, x.positions, self.layer_types)
        return LayerInputs(masks, x.positions, extra, rotary)

    def _check_mask(self, x: Activations, cache: Cache | None) -> None:
        batch, new = x.hidden.shape[:2]
        cached = cache.get_seq_length(self.start) if cache is not None else 0
        expected = (batch, cached + new)
        if tuple(x.attention_mask.shape) != expected:
            raise ShapeMismatchError(
                f"attention_mask for layers [{self.start}, {self.stop}) must be (B, cached + T) = {expected} "
                f"({cached} cached prefix/past keys + {new} new tokens); got {tuple(x.attention_mask.shape)}. "
                "Prepend the prefix with extend_mask()."
            )
        if tuple(x.positions.shape) != (batch, new):
            raise ShapeMismatchError(f"positions must be {(batch, new)}; got {tuple(x.positions.shape)}")

    def _mask(self, x: Activations, cache: Cache | None, kind: str) -> torch.Tensor | None:
        make = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
        first = self.start + self.layer_types.index(kind)  # size the mask against a layer of this kind
        return make(
            config=self.config,
            inputs_embeds=x.hidden,
            attention_mask=x.attention_mask,
            cache=cache,
            position_ids=x.positions,
            layer_idx=first,
            allow_is_causal_skip=not self.arch.materialise_masks,
        )


class Head(nn.Module):
    """The final norm and the LM head: hidden states (B, T, d) to logits (B, T, V)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.arch = architecture_of(model.config)
        self.config = model.config
        self.norm = self.arch.part(model, self.arch.final_norm)
        self.lm_head = model.get_output_embeddings()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.norm(hidden))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of normed hidden states, with the family's soft-cap or scaling applied."""
        return self.arch.logit_transform(self.config, self.lm_head(normed))


class Bottom(nn.Module):
    """The data party's first network part: embeddings and layers [0, K)."""

    def __init__(self, model: PreTrainedModel, split_at: int) -> None:
        super().__init__()
        self.embeddings = Embeddings(model)
        self.stack = LayerStack(model, 0, split_at)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache | None = None,
    ) -> Activations:
        """`attention_mask` is (B, cached + T); returns the layer-K activations for the top part."""
        x = Activations(self.embeddings(input_ids, positions), attention_mask, positions)
        x.hidden = self.stack(x, cache)  # (B, T, d)
        return x


class Top(nn.Module):
    """The model party's second network part: layers [K, L - M), plus norm and head when on the server.

    M = `client_layers` is the U-shaped split's top, which the data party keeps (head=client only).
    """

    def __init__(
        self, model: PreTrainedModel, split_at: int, head: HeadPlacement = "server", client_layers: int = 0
    ) -> None:
        super().__init__()
        stop = model.config.num_hidden_layers - client_layers
        if client_layers and head == "server":
            raise ConfigError("a data party that keeps the top layers also keeps the head: use head=client")
        if not split_at < stop:
            raise ConfigError(f"the server must run a layer: need K={split_at} < L - M={stop}")
        self.stack = LayerStack(model, split_at, stop)
        self.head = Head(model) if head == "server" else None

    def forward(self, x: Activations, cache: Cache | None = None) -> torch.Tensor:
        """Logits (B, T, V) with the head on the server, else the last hidden states (B, T, d)."""
        hidden = self.stack(x, cache)
        return hidden if self.head is None else self.head(hidden)


class ClientTop(nn.Module):
    """The data party's top: layers [L - M, L), the final norm and the LM head (weights shared)."""

    def __init__(self, model: PreTrainedModel, client_layers: int) -> None:
        super().__init__()
        if client_layers < 0:
            raise ConfigError(f"client_layers must be >= 0; got M={client_layers}")
        num_layers = model.config.num_hidden_layers
        self.start = num_layers - client_layers
        self.stack = LayerStack(model, self.start, num_layers)
        self.head = Head(model)

    @property
    def client_layers(self) -> int:
        return len(self.stack.layers)

    def forward(self, x: Activations, kv: torch.Tensor) -> torch.Tensor:
        """h_L (B, T, d) from the server's h_{L-M} in `x`, with this party's `kv` (M, 2, n_kv, P, hd);
        with M = 0 the states pass unchanged (norm and head only)."""
        if not self.client_layers:
            return x.hidden
        batch, p = x.hidden.shape[0], kv.shape[3]
        config = self.stack.config
        cache = prefix_cache(kv, config, batch, first_layer=self.start) if p else None
        return self.stack(x, cache)


class SplitParts(NamedTuple):
    """The views of one model cut at K. `head` is set only for the head-on-client cut."""

    bottom: Bottom
    top: Top
    head: Head | None


def split_model(model: PreTrainedModel, split_at: int, head: HeadPlacement = "server") -> SplitParts:
    """Cut `model` at layer K. The parts share the model's weights; nothing is copied."""
    check_split_at(split_at, model.config.num_hidden_layers)
    if head not in ("server", "client"):
        raise ConfigError(f"head must be 'server' or 'client'; got {head!r}")
    return SplitParts(
        bottom=Bottom(model, split_at),
        top=Top(model, split_at, head),
        head=Head(model) if head == "client" else None,
    )
