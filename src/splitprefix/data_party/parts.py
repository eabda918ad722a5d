"""What the data party loads of an emulator, and nothing more.

A split session runs the embeddings, layers [0, K) and, with head=client, the final norm and LM
head: only those tensors are read from the emulator's safetensors file(s); the kept upper layers,
which only offsite training runs, stay on the meta device and are never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from splitprefix.model.partial_load import load_parts
from splitprefix.model.split import Bottom, Head, HeadPlacement


class ClientParts(NamedTuple):
    """The data party's parts of an emulator for a split session."""

    bottom: Bottom
    """Embeddings and layers [0, K), frozen."""
    head: Head | None
    """Final norm and LM head with head=client; None when the server applies them."""


def load_client_parts(
    emulator_dir: str | Path,
    split_at: int,
    head: HeadPlacement,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ClientParts:
    """Read the bottom K layers (and the head with head=client) of the emulator, in `dtype` on `device`."""

    def parts(model: PreTrainedModel) -> ClientParts:
        return ClientParts(Bottom(model, split_at), Head(model) if head == "client" else None)

    return load_parts(emulator_dir, parts, dtype, device)[1]
