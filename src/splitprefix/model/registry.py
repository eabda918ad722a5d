"""The one place where supported architecture families differ.

Every other module asks this registry where a model keeps its parts (embeddings, layers, final
norm, rotary embedding) and how it runs them where families differ beyond names: embedding scale,
logit transform, rotary embeddings per layer type, sliding-window layers, the shape of each
layer's key/value cache, how a layer is called (cache keyword, extra inputs, what it returns) and
which per-layer config fields an emulator renumbers. Each hook mirrors what the family's
transformers code does outside its decoder layers. Adding a family means adding one
`Architecture` entry to `ARCHITECTURES` and a tiny config to tests/families.py; the family test
in tests/model then covers it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from splitprefix.errors import UnsupportedArchitectureError

FULL, SLIDING = "full_attention", "sliding_attention"
PositionEmbeddings = tuple[torch.Tensor, torch.Tensor]
Masks = dict[str, torch.Tensor | None]
"""The attention mask of each layer type, as `create_causal_mask` builds it."""


@dataclass(frozen=True)
class LayerKV:
    """What one decoder layer caches per token: `num_kv_heads` keys and values of their own widths."""

    num_kv_heads: int
    """Key/value heads (fewer than attention heads under grouped-query attention)."""
    key_dim: int
    """Width of one cached key head."""
    value_dim: int
    """Width of one cached value head."""


# --- layer types: which layers attend through a sliding window ---------------------------------


def _all_full(config: PretrainedConfig) -> list[str]:
    return [FULL] * config.num_hidden_layers


def _sliding_if_window(config: PretrainedConfig) -> list[str]:
    # Mistral, Mixtral, Phi-3 and Qwen3-MoE slide every layer when a window is configured.
    return [SLIDING if config.sliding_window is not None else FULL] * config.num_hidden_layers


def _from_layer_types(config: PretrainedConfig) -> list[str]:
    return list(getattr(config, "layer_types", None) or _all_full(config))


# --- key/value cache shapes ----------------------------------------------------------------------


def _grouped_query_kv(config: PretrainedConfig) -> list[LayerKV]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return [LayerKV(kv_heads, head_dim, head_dim)] * config.num_hidden_layers


def _multi_head_kv(config: PretrainedConfig) -> list[LayerKV]:
    # GPT-2 and GPT-NeoX give every attention head its own keys; a num_key_value_heads or head_dim
    # attribute on their config is not read by their attention, so it is not read here either.
    heads = config.num_attention_heads
    return [
        LayerKV(heads, config.hidden_size // heads, config.hidden_size // heads)
    ] * config.num_hidden_layers


def _falcon_kv(config: PretrainedConfig) -> list[LayerKV]:
    # Falcon's new decoder architecture broadcasts its kv heads to every query head before caching;
    # the old one caches one head under multi-query attention, else num_kv_heads.
    heads = config.num_attention_heads
    kv_heads = config.num_kv_heads if not config.multi_query else 1
    kv_heads = heads if config.new_decoder_architecture else kv_heads
    head_dim = config.hidden_size // heads
    return [LayerKV(kv_heads, head_dim, head_dim)] * config.num_hidden_layers


def _latent_kv(config: PretrainedConfig) -> list[LayerKV]:
    # DeepSeek-V3's multi-head latent attention caches the compressed latents, not expanded heads:
    # as "keys" the normalised kv latent (kv_lora_rank wide), as "values" the shared rotary key
    # (qk_rope_head_dim wide), one head each; kv_b_proj expands them after the cache is read.
    return [LayerKV(1, config.kv_lora_rank, config.qk_rope_head_dim)] * config.num_hidden_layers


# --- rotary embeddings ---------------------------------------------------------------------------


def _shared_rotary(
    rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, layer_types: Sequence[str]
) -> dict[str, PositionEmbeddings]:
    embeddings = rotary(hidden, position_ids=positions)
    return dict.fromkeys(layer_types, embeddings)


def _rotary_per_layer_type(
    rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, layer_types: Sequence[str]
) -> dict[str, PositionEmbeddings]:
    # Gemma 3: local (sliding) and global layers rotate with different bases.
    return {kind: rotary(hidden, positions, kind) for kind in set(layer_types)}


# --- what layers take besides hidden states, masks, positions and the cache ------------------------


def _no_extra_inputs(
    config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor, masks: Masks
) -> tuple[Masks, dict[str, Any]]:
    return masks, {}


def _falcon_alibi(
    config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor, masks: Masks
) -> tuple[Masks, dict[str, Any]]:
    """Falcon's layers take `alibi`; with ALiBi on, its bias is also fused into the (materialised)
    masks, as FalconModel.forward does. `attention_mask` (B, S) covers prefix, past and new tokens."""
    if not config.alibi:
        return masks, {"alibi": None}
    alibi = build_alibi_tensor(attention_mask, config.num_attention_heads, dtype=hidden.dtype)  # (B*H, 1, S)
    per_batch = alibi.reshape(hidden.shape[0], -1, *alibi.shape[1:])  # (B, H, 1, S)
    lowest = torch.finfo(hidden.dtype).min
    scale = math.sqrt(config.hidden_size // config.num_attention_heads)
    fused: Masks = {}
    for kind, mask in masks.items():
        if mask is None or mask.ndim != 4:
            fused[kind] = mask
            continue
        if mask.dtype == torch.bool:
            mask = torch.where(mask, torch.full((), 0.0, device=mask.device, dtype=hidden.dtype), lowest)
        fused[kind] = torch.masked_fill(per_batch / scale, mask < -1, lowest)
    return fused, {"alibi": alibi}


def _hidden_states(output: Any) -> torch.Tensor:
    return output


def _first_of_tuple(output: Any) -> torch.Tensor:
    return output[0]  # Falcon's layers return (hidden states, attention weights)


# --- per-layer config fields, for a model that keeps only some layers (the emulator) -------------


def _no_layer_fields(config: PretrainedConfig, kept: list[int]) -> None:
    return None


def _qwen3_moe_sparse_layers(config: PretrainedConfig, kept: list[int]) -> None:
    # A layer is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid; list
    # the kept dense layers explicitly, since the grid does not survive renumbering.
    dense = [
        new
        for new, old in enumerate(kept)
        if old in config.mlp_only_layers or config.num_experts == 0 or (old + 1) % config.decoder_sparse_step
    ]
    config.mlp_only_layers, config.decoder_sparse_step = dense, 1


def _deepseek_dense_layers(config: PretrainedConfig, kept: list[int]) -> None:
    # Layers below first_k_dense_replace are dense; `kept` is sorted, so they stay a leading block.
    config.first_k_dense_replace = sum(old < config.first_k_dense_replace for old in kept)


# --- configurations a family's entry does not serve ----------------------------------------------


def _any_config(config: PretrainedConfig) -> str | None:
    return None


def _causal_gemma3(config: PretrainedConfig) -> str | None:
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention=True (the split builds causal masks only)"
    return None


# --- embedding scale and logit transforms -----------------------------------------------------------


def _no_embedding_scale(config: PretrainedConfig) -> float | None:
    # Gemma scales by sqrt(d) inside its embedding module, so it needs nothing here.
    return None


def _embedding_multiplier(config: PretrainedConfig) -> float | None:
    return config.embedding_multiplier  # Granite


def _logits_unchanged(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    return logits


def _final_softcap(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    # Gemma 2 and 3; the same three operations in the same order as HF, for bit-equal logits.
    cap = config.final_logit_softcapping
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _divide_by_logits_scaling(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    return logits / config.logits_scaling  # Granite


def _multiply_by_logit_scale(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    return logits * config.logit_scale  # Cohere


@dataclass(frozen=True)
class Architecture:
    """Where one architecture family keeps its parts inside a `*ForCausalLM` model, and how it runs them."""

    name: str
    """The `config.model_type` this entry serves."""
    backbone: str = "model"
    """Attribute of the causal-LM wrapper that holds the decoder (`model`, `transformer`)."""
    embed_tokens: str = "embed_tokens"
    """Attribute of the backbone holding the token embedding."""
    layers: str = "layers"
    """Attribute of the backbone holding the `nn.ModuleList` of decoder layers."""
    final_norm: str = "norm"
    """Attribute of the backbone holding the norm applied before the LM head."""
    embed_positions: str | None = None
    """Attribute of the backbone holding learned position embeddings; None for rotary models."""
    embed_dropout: str | None = None
    """Attribute of the backbone holding dropout applied after the embeddings, if any."""
    rotary: str | None = "rotary_emb"
    """Attribute of the backbone holding the rotary embedding module; None without one."""
    layer_types: Callable[[PretrainedConfig], list[str]] = _all_full
    """Each layer's attention kind, `full_attention` or `sliding_attention`."""
    rotary_embeddings: Callable[..., dict[str, PositionEmbeddings]] = _shared_rotary
    """(rotary, hidden, positions, layer types) -> position embeddings for each layer type."""
    embedding_scale: Callable[[PretrainedConfig], float | None] = _no_embedding_scale
    """Factor the model multiplies its token embeddings by outside the embedding module, if any."""
    logit_transform: Callable[[PretrainedConfig, torch.Tensor], torch.Tensor] = _logits_unchanged
    """What the causal-LM class does to the LM head's output (soft-capping, scaling)."""
    kv_layout: Callable[[PretrainedConfig], list[LayerKV]] = _grouped_query_kv
    """The key/value cache shape of every layer, read as the family's attention reads its config."""
    cache_keyword: str = "cache"
    """Keyword a decoder layer takes the cache by (GPT-NeoX, Falcon: `layer_past`)."""
    layer_inputs: Callable[..., tuple[Masks, dict[str, Any]]] = _no_extra_inputs
    """(config, hidden, 2D mask, masks) -> masks and extra layer keywords (Falcon: `alibi`)."""
    materialise_masks: bool = False
    """Build 4D masks even where sdpa could skip them (Falcon adds ALiBi onto them)."""
    layer_output: Callable[[Any], torch.Tensor] = _hidden_states
    """The hidden states in what a decoder layer returns."""
    keep_layer_fields: Callable[[PretrainedConfig, list[int]], None] = _no_layer_fields
    """Rewrite, in place, the family's per-layer config fields beyond `layer_types` for a model
    that keeps only the original layers `kept`."""
    unsupported: Callable[[PretrainedConfig], str | None] = _any_config
    """Why this entry cannot serve a config of its family (an option it does not implement), or None."""

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
    entry.name: entry
    for entry in (
        Architecture("llama"),
        Architecture("qwen2", layer_types=_from_layer_types),
        Architecture("qwen3", layer_types=_from_layer_types),
        Architecture("qwen3_moe", layer_types=_sliding_if_window, keep_layer_fields=_qwen3_moe_sparse_layers),
        Architecture("mistral", layer_types=_sliding_if_window),
        Architecture("mixtral", layer_types=_sliding_if_window),
        Architecture("phi3", layer_types=_sliding_if_window),
        Architecture("olmo2"),
        Architecture("gemma2", layer_types=_from_layer_types, logit_transform=_final_softcap),
        Architecture(
            "gemma3_text",
            layer_types=_from_layer_types,
            logit_transform=_final_softcap,
            rotary_embeddings=_rotary_per_layer_type,
            unsupported=_causal_gemma3,
        ),
        Architecture(
            "granite", embedding_scale=_embedding_multiplier, logit_transform=_divide_by_logits_scaling
        ),
        Architecture("cohere", logit_transform=_multiply_by_logit_scale),
        Architecture(
            "gpt2",
            backbone="transformer",
            embed_tokens="wte",
            layers="h",
            final_norm="ln_f",
            embed_positions="wpe",
            embed_dropout="drop",
            rotary=None,
            kv_layout=_multi_head_kv,
        ),
        Architecture(
            "gpt_neox",
            backbone="gpt_neox",
            embed_tokens="embed_in",
            final_norm="final_layer_norm",
            embed_dropout="emb_dropout",
            kv_layout=_multi_head_kv,
            cache_keyword="layer_past",
        ),
        Architecture("deepseek_v3", kv_layout=_latent_kv, keep_layer_fields=_deepseek_dense_layers),
        Architecture(
            "falcon",
            backbone="transformer",
            embed_tokens="word_embeddings",
            layers="h",
            final_norm="ln_f",
            kv_layout=_falcon_kv,
            cache_keyword="layer_past",
            layer_inputs=_falcon_alibi,
            materialise_masks=True,
            layer_output=_first_of_tuple,
        ),
    )
}


def supported_architectures() -> list[str]:
    """The `model_type`s the registry serves, sorted."""
    return sorted(ARCHITECTURES)


def config_keeping_layers(config: PretrainedConfig, kept: list[int]) -> PretrainedConfig:
    """A copy of `config` for a model made of the original layers `kept` (sorted), in that order."""
    arch = architecture_of(config)
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        out.layer_types = [config.layer_types[i] for i in kept]
    arch.keep_layer_fields(out, kept)
    return out


def architecture_of(config: PretrainedConfig) -> Architecture:
    """The registry entry for `config.model_type`, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(supported_architectures())
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported architectures: {supported}"
        )
    entry = ARCHITECTURES[model_type]
    reason = entry.unsupported(config)
    if reason is not None:
        raise UnsupportedArchitectureError(f"{model_type} with {reason} is not supported")
    return entry


@dataclass(frozen=True)
class ModelDims:
    """The sizes that the split and the prefix depend on."""

    num_layers: int
    """Number of decoder layers L."""
    hidden_size: int
    """Width d of the hidden states."""
    num_kv_heads: int
    """Key/value heads of the prefix tensor: the most any layer caches."""
    head_dim: int
    """Head width of the prefix tensor: the widest key or value any layer caches."""
    vocab_size: int
    """Rows of the LM head."""
    layer_kv: tuple[LayerKV, ...] = ()
    """What each layer caches; narrower layers use the leading heads and columns of the prefix tensor."""

    @property
    def uniform(self) -> bool:
        """True when every layer caches exactly (num_kv_heads, head_dim) for keys and for values."""
        full = LayerKV(self.num_kv_heads, self.head_dim, self.head_dim)
        return all(layer == full for layer in self.layer_kv)


def model_dims(config: PretrainedConfig) -> ModelDims:
    """Read the split- and prefix-relevant sizes from any supported config."""
    layers = tuple(architecture_of(config).kv_layout(config))
    return ModelDims(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_kv_heads=max(layer.num_kv_heads for layer in layers),
        head_dim=max(max(layer.key_dim, layer.value_dim) for layer in layers),
        vocab_size=config.vocab_size,
        layer_kv=layers,
    )


def scale_embeddings(config: PretrainedConfig, embeddings: torch.Tensor) -> torch.Tensor:
    """Apply the family's embedding scale, if it has one outside the embedding module. (B, T, d)"""
    scale = architecture_of(config).embedding_scale(config)
    return embeddings if scale is None else embeddings * scale
