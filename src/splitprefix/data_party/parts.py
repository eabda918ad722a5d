"""What the data party loads of an emulator, and nothing more.

A split session runs the embeddings, layers [0, K) and, with head=client, the final norm and LM
head (and with the U-shaped split the emulator's last M layers, the full model's own): only those
tensors are read from the emulator's safetensors file(s); the other kept upper layers, which only
offsite training runs, stay on the meta device and are never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from splitprefix.model.partial_load import load_parts
from splitprefix.model.split import Bottom, ClientTop, Head, HeadPlacement


class ClientParts(NamedTuple):
    """The data party's parts of an emulator for a split session."""

    bottom: Bottom
    """Embeddings and layers [0, K), frozen."""
    head: Head | None
    """Final norm and LM head with head=client; None when the server applies them."""
    client_top: ClientTop | None = None
    """With head=client: layers [L - M, L) (none when M = 0), norm and head; None with head=server."""


def load_client_parts(
    emulator_dir: str | Path,
    split_at: int,
    head: HeadPlacement,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    client_layers: int = 0,
) -> ClientParts:
    """Read the bottom K layers (and the head with head=client, and the last M = `client_layers`
    layers) of the emulator, in `dtype` on `device`."""

    def parts(model: PreTrainedModel) -> ClientParts:
        top = ClientTop(model, client_layers) if head == "client" else None
        return ClientParts(Bottom(model, split_at), Head(model) if head == "client" else None, top)

    return load_parts(emulator_dir, parts, dtype, device)[1]
