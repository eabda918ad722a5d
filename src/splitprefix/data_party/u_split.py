"""The U-shaped split: the data party keeps the bottom K layers and also the top M layers.

The server runs layers [K, L - M) only and returns h_{L-M}; the data party runs [L - M, L), the
final norm and the head, with its own prefix for those layers, which is never sent. The gradient it
sends back is then dL/dh_{L-M}: to invert it, the model party must run layers whose prefix it does
not know. With M = 0 this is head=client.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from splitprefix.data.batching import IGNORE_INDEX, Batch
from splitprefix.data_party.privacy import HiddenPrivacy
from splitprefix.data_party.split_train import TopPart, next_token_targets, wire_activations
from splitprefix.data_party.train import LossFn
from splitprefix.errors import ConfigError
from splitprefix.model.prefix import prefix_cache
from splitprefix.model.split import Activations, Bottom, Head, LayerStack, check_split_at


def check_client_layers(split_at: int, client_layers: int, num_layers: int) -> None:
    """Raise unless 0 <= M and K < L - M, so that the server still runs at least one layer."""
    check_split_at(split_at, num_layers)
    if not isinstance(client_layers, int) or client_layers < 0 or split_at >= num_layers - client_layers:
        raise ConfigError(
            f"client_layers M must satisfy 0 <= M < L - K = {num_layers - split_at}; got M={client_layers!r}"
        )


class ClientTop(nn.Module):
    """The data party's top: layers [L - M, L), the final norm and the LM head (weights shared)."""

    def __init__(self, model: PreTrainedModel, client_layers: int) -> None:
        super().__init__()
        if client_layers < 1:
            raise ConfigError(f"a client top holds at least one layer; got M={client_layers}")
        num_layers = model.config.num_hidden_layers
        self.start = num_layers - client_layers
        self.stack = LayerStack(model, self.start, num_layers)
        self.head = Head(model)

    @property
    def client_layers(self) -> int:
        return len(self.stack.layers)

    def forward(self, x: Activations, kv: torch.Tensor) -> torch.Tensor:
        """h_L (B, T, d) from the server's h_{L-M} in `x`, with this party's `kv` (M, 2, n_kv, P, hd)."""
        batch, p = x.hidden.shape[0], kv.shape[3]
        config = self.stack.config
        cache = prefix_cache(kv, config, batch, first_layer=self.start) if p else None
        return self.stack(x, cache)


def u_split_loss_fn(
    bottom: Bottom,
    remote_top: TopPart,
    client_top: ClientTop,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
) -> LossFn:
    """A `LossFn` through the U-split: bottom here, layers [K, L - M) on the server (head=client
    protocol, which returns h_{L-M}), then the top M layers, norm and head here. Equals the whole
    model's summed token loss when `privacy` is None; the prefix `kv` covers all L layers."""
    if remote_top.head != "client":
        raise ConfigError("the U-shaped split keeps the head at the data party: use head=client")
    stop = client_top.start

    def loss_fn(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        targets = next_token_targets(batch.labels)  # (B, T)
        supervised = targets != IGNORE_INDEX
        count = int(supervised.sum())
        if not count:
            return kv.sum() * 0.0, 0
        x = wire_activations(bottom, batch.input_ids, batch.attention_mask, kv, split_at, privacy)
        middle = remote_top(x, kv[split_at:stop])  # h_{L-M} (B, T, d); kv[stop:] never leaves
        device = x.hidden.device
        top_kv = kv[stop:].to(device, middle.dtype)  # (M, 2, n_kv, P, hd)
        hidden = client_top(Activations(middle.to(device), x.attention_mask, x.positions), top_kv)
        logits = client_top.head(hidden[supervised.to(device)])  # (N, V)
        return F.cross_entropy(logits.float(), targets[supervised].to(device), reduction="sum"), count

    return loss_fn
