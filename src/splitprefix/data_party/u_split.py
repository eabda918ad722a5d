"""The U-shaped split: the data party keeps the bottom K layers and also the top M layers.

The server runs layers [K, L - M) only and returns h_{L-M}; the data party runs [L - M, L), the
final norm and the head, with its own prefix for those layers, which is never sent. The gradient it
sends back is then dL/dh_{L-M}: to invert it, the model party must run layers whose prefix it does
not know. With M = 0 this is head=client. Either way the gradient may also be noised before it
leaves (`gradient_noise`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitprefix.data.batching import IGNORE_INDEX, Batch
from splitprefix.data_party.gradient_noise import GradientNoiser
from splitprefix.data_party.privacy import HiddenPrivacy
from splitprefix.data_party.split_forward import TopPart, wire_activations
from splitprefix.data_party.train import LossFn
from splitprefix.errors import ConfigError
from splitprefix.evaluation.metrics import next_token_targets
from splitprefix.model.split import Activations, Bottom, ClientTop, check_split_at


def check_client_layers(split_at: int, client_layers: int, num_layers: int) -> None:
    """Raise unless 0 <= M and K < L - M, so that the server still runs at least one layer."""
    check_split_at(split_at, num_layers)
    if not isinstance(client_layers, int) or client_layers < 0 or split_at >= num_layers - client_layers:
        raise ConfigError(
            f"client_layers M must satisfy 0 <= M < L - K = {num_layers - split_at}; got M={client_layers!r}"
        )


def u_split_loss_fn(
    bottom: Bottom,
    remote_top: TopPart,
    client_top: ClientTop,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
    grad_noise: GradientNoiser | None = None,
) -> LossFn:
    """A `LossFn` through the U-split: bottom here, layers [K, L - M) on the server (head=client
    protocol, which returns h_{L-M}), then the top M layers, norm and head here. Equals the whole
    model's summed token loss when `privacy` is None; the prefix `kv` covers all L layers."""
    if remote_top.head != "client":
        raise ConfigError("the U-shaped split keeps the head at the data party: use head=client")

    def loss_fn(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        targets = next_token_targets(batch.labels)  # (B, T)
        supervised = targets != IGNORE_INDEX
        count = int(supervised.sum())
        if not count:
            return kv.sum() * 0.0, 0
        x = wire_activations(bottom, batch.input_ids, batch.attention_mask, kv, split_at, privacy)
        stop = (
            kv.shape[0] - client_top.client_layers
        )  # L - M of the full model (the top may be an emulator's)
        middle = remote_top(x, kv[split_at:stop])  # h_{L-M} (B, T, d); kv[stop:] never leaves
        if grad_noise is not None:
            middle = grad_noise(middle, batch.attention_mask)  # what the backward sends is noised
        device = x.hidden.device
        top_kv = kv[stop:].to(device, middle.dtype)  # (M, 2, n_kv, P, hd)
        hidden = client_top(Activations(middle.to(device), x.attention_mask, x.positions), top_kv)
        logits = client_top.head(hidden[supervised.to(device)])  # (N, V)
        return F.cross_entropy(logits.float(), targets[supervised].to(device), reduction="sum"), count

    return loss_fn
