"""Loading models and tokenizers from a local directory or the shipped `builtin` model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from splitprefix.model.builtin import BUILTIN_NAME, builtin_dir
from splitprefix.model.registry import architecture_of, model_dims


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """The directory behind `name_or_dir`; the name `builtin` selects the shipped model."""
    if str(name_or_dir) == BUILTIN_NAME:
        return builtin_dir()
    path = Path(name_or_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a model directory (no config.json); pass a directory written by "
            f"save_pretrained, or '{BUILTIN_NAME}' for the shipped model"
        )
    return path


def checkpoint_dtype(name_or_dir: str | Path) -> torch.dtype:
    """The dtype a model's weights are stored in, as its config.json records it (fp32 if unsaid)."""
    raw = json.loads((resolve_model_dir(name_or_dir) / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_causal_lm(
    name_or_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str = "cpu",
) -> PreTrainedModel:
    """A supported causal LM on `device` in eval mode, with its weights frozen."""
    path = resolve_model_dir(name_or_dir)
    architecture_of(AutoConfig.from_pretrained(path))  # fail before loading weights
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.requires_grad_(False)
    torch.nn.Module.to(model, device=device)  # transformers types its own `.to` oddly
    return model.eval()


def load_tokenizer(name_or_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_dir(name_or_dir))


def describe_model(name_or_dir: str | Path) -> dict[str, Any]:
    """Architecture and sizes of a model, read from its config only."""
    config = AutoConfig.from_pretrained(resolve_model_dir(name_or_dir))
    dims = model_dims(config)
    real_entries = sum(layer.num_kv_heads * (layer.key_dim + layer.value_dim) for layer in dims.layer_kv)
    return {
        "architecture": architecture_of(config).name,
        "num_layers": dims.num_layers,
        "hidden_size": dims.hidden_size,
        "num_kv_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab_size,
        "prefix_params_per_virtual_token": real_entries,
        "prefix_padding_per_virtual_token": dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim
        - real_entries,
    }
