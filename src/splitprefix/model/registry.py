"""The one place where supported architecture families differ.

Every other module asks this registry where a model keeps its embeddings, layers, final norm and
rotary embedding. Adding a family means adding one `Architecture` entry to `ARCHITECTURES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from splitprefix.errors import UnsupportedArchitectureError


def _no_sliding_layers(config: PretrainedConfig) -> list[bool]:
    return [False] * config.num_hidden_layers


def _sliding_if_window(config: PretrainedConfig) -> list[bool]:
    # Mistral applies its sliding window to every layer when one is configured.
    return [config.sliding_window is not None] * config.num_hidden_layers


def _sliding_from_layer_types(config: PretrainedConfig) -> list[bool]:
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [kind == "sliding_attention" for kind in layer_types]


@dataclass(frozen=True)
class Architecture:
    """Where one architecture family keeps its parts inside a `*ForCausalLM` model."""

    name: str
    """The `config.model_type` this entry serves."""
    backbone: str
    """Attribute of the causal-LM wrapper that holds the decoder (`model`, `transformer`)."""
    embed_tokens: str
    """Attribute of the backbone holding the token embedding."""
    layers: str
    """Attribute of the backbone holding the `nn.ModuleList` of decoder layers."""
    final_norm: str
    """Attribute of the backbone holding the norm applied before the LM head."""
    embed_positions: str | None = None
    """Attribute of the backbone holding learned position embeddings; None for rotary models."""
    embed_dropout: str | None = None
    """Attribute of the backbone holding dropout applied after the embeddings, if any."""
    rotary: str | None = None
    """Attribute of the backbone holding the rotary embedding module, if any."""
    sliding_layers: Callable[[PretrainedConfig], list[bool]] = _no_sliding_layers
    """Which layers use a sliding-window attention mask."""

    def backbone_of(self, model: PreTrainedModel) -> nn.Module:
        return getattr(model, self.backbone)

    def layers_of(self, model: PreTrainedModel) -> nn.ModuleList:
        return getattr(self.backbone_of(model), self.layers)

    def part(self, model: PreTrainedModel, attribute: str) -> nn.Module:
        """The backbone's submodule named `attribute`."""
        return getattr(self.backbone_of(model), attribute)

    def optional_part(self, model: PreTrainedModel, attribute: str | None) -> nn.Module | None:
        """The backbone's submodule named `attribute`, or None when the family has no such part."""
        return None if attribute is None else self.part(model, attribute)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        name="llama",
        backbone="model",
        embed_tokens="embed_tokens",
        layers="layers",
        final_norm="norm",
        rotary="rotary_emb",
    ),
    "qwen2": Architecture(
        name="qwen2",
        backbone="model",
        embed_tokens="embed_tokens",
        layers="layers",
        final_norm="norm",
        rotary="rotary_emb",
        sliding_layers=_sliding_from_layer_types,
    ),
    "mistral": Architecture(
        name="mistral",
        backbone="model",
        embed_tokens="embed_tokens",
        layers="layers",
        final_norm="norm",
        rotary="rotary_emb",
        sliding_layers=_sliding_if_window,
    ),
    "gpt2": Architecture(
        name="gpt2",
        backbone="transformer",
        embed_tokens="wte",
        layers="h",
        final_norm="ln_f",
        embed_positions="wpe",
        embed_dropout="drop",
    ),
}


def architecture_of(config: PretrainedConfig) -> Architecture:
    """The registry entry for `config.model_type`, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported architectures: {supported}"
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class ModelDims:
    """The sizes that the split and the prefix depend on."""

    num_layers: int
    """Number of decoder layers L."""
    hidden_size: int
    """Width d of the hidden states."""
    num_kv_heads: int
    """Key/value heads per layer (fewer than attention heads under grouped-query attention)."""
    head_dim: int
    """Width of one attention head."""
    vocab_size: int
    """Rows of the LM head."""


def model_dims(config: PretrainedConfig) -> ModelDims:
    """Read the split- and prefix-relevant sizes from any supported config."""
    architecture_of(config)
    heads = config.num_attention_heads
    return ModelDims(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
    )
