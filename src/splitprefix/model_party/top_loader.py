"""Loading only the model party's part of a model: layers [K, L), the final norm and the LM head.

The model is built on the meta device (no memory), and only the parameters the top runs are read
from the safetensors file(s) (`model.partial_load`). The bottom (embeddings and layers [0, K)) is
only hashed, tensor by tensor from the file, for its fingerprint: the server never holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.model.emulator import config_fingerprint, stored_bottom_fingerprint, tokenizer_fingerprint
from splitprefix.model.loading import load_tokenizer, resolve_model_dir
from splitprefix.model.partial_load import materialise, meta_model, open_checkpoint
from splitprefix.model.split import Head, LayerStack, check_split_at


@dataclass
class LoadedTop:
    """The server's part of a model and the fingerprints of the whole."""

    model: PreTrainedModel
    """The model skeleton: only layers [K, L), the final norm and the head hold real weights."""
    stack: LayerStack
    """Layers [K, L)."""
    head: Head
    """Final norm and LM head."""
    tokenizer: PreTrainedTokenizerBase
    base_config_sha256: str
    tokenizer_sha256: str
    bottom_sha256: str


def load_top(
    model_dir: str | Path, split_at: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedTop:
    """Layers [K, L), norm and head of the model in `model_dir`, plus the whole model's fingerprints."""
    path = resolve_model_dir(model_dir)
    config = AutoConfig.from_pretrained(path)
    model = meta_model(config)
    check_split_at(split_at, config.num_hidden_layers)
    reader = open_checkpoint(path, model)
    bottom_sha256 = stored_bottom_fingerprint(reader, model, split_at)  # never materialised
    stack = LayerStack(model, split_at, config.num_hidden_layers)
    head = Head(model)
    materialise(model, reader, [stack, head], dtype, device)
    tokenizer = load_tokenizer(path)
    return LoadedTop(
        model=model,
        stack=stack,
        head=head,
        tokenizer=tokenizer,
        base_config_sha256=config_fingerprint(model),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        bottom_sha256=bottom_sha256,
    )
