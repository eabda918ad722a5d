"""The split forward pass and its loss: the bottom K layers here, the layers above on the model party.

`wire_activations` is what leaves the data party; `split_loss_fn` is the `LossFn` that training,
the federation's parties and the privacy audit run through the split.
"""

from __future__ import annotations

from typing import Protocol

import torch

from splitprefix.data.batching import IGNORE_INDEX, Batch
from splitprefix.data_party.privacy import HiddenPrivacy
from splitprefix.data_party.train import LossFn
from splitprefix.errors import ConfigError
from splitprefix.evaluation.metrics import next_token_targets, supervised_loss_sum
from splitprefix.model.prefix import prefix_cache
from splitprefix.model.split import Activations, Bottom, Head, extend_mask, token_positions
from splitprefix.wire.schemas import HeadMode


class TopPart(Protocol):
    """The model party's layers [K, L) as the data party calls them: `RemoteTop`, or a local stand-in."""

    @property
    def head(self) -> HeadMode: ...

    def __call__(self, x: Activations, top_kv: torch.Tensor) -> torch.Tensor:
        """head=client: the last hidden states (B, T, d)."""
        ...

    def loss(self, x: Activations, top_kv: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """head=server: the summed cross-entropy () of `targets` (B, T), -100 where there is none."""
        ...


def run_split(
    bottom: Bottom,
    remote_top: TopPart,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    kv: torch.Tensor,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
) -> torch.Tensor:
    """head=client: the bottom with `kv[:K]` here, then the server's layers with `kv[K:]`; returns
    the last hidden states (B, T, d)."""
    x = wire_activations(bottom, input_ids, token_mask, kv, split_at, privacy)
    return remote_top(x, kv[split_at:])


def wire_activations(
    bottom: Bottom,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    kv: torch.Tensor,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
) -> Activations:
    """The layer-K activations exactly as they are sent to the model party: hidden (B, T, d),
    the mask over prefix and tokens (B, P + T), and the positions (B, T).

    `kv` is (L, 2, n_kv, P, hd) and may have P = 0 (no prefix); its bottom K layers are used here.
    `privacy` clips and noises the layer-K states before they leave.
    """
    p = kv.shape[3]
    device = bottom_device(bottom)
    token_mask = token_mask.to(device)
    mask, positions = extend_mask(token_mask, p), token_positions(token_mask, p)
    bottom_kv = kv[:split_at].to(device, bottom_dtype(bottom))  # a differentiable cast: grads reach kv
    cache = prefix_cache(bottom_kv, bottom.stack.config, input_ids.shape[0]) if p else None
    x = bottom(input_ids.to(device), mask, positions, cache)  # hidden (B, T, d) at layer K
    if privacy is not None:
        x.hidden = privacy(x.hidden, token_mask)
    return x


def bottom_device(bottom: Bottom) -> torch.device:
    return next(bottom.parameters()).device


def bottom_dtype(bottom: Bottom) -> torch.dtype:
    return next(bottom.parameters()).dtype


def split_loss_fn(
    bottom: Bottom,
    remote_top: TopPart,
    head: Head | None,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
) -> LossFn:
    """A `LossFn` for `train_prefix` through the split; equals `token_loss_sum` of the whole model
    when `privacy` is None.

    head=client applies the data party's `head` to the returned hidden states; head=server sends
    the targets, and the server returns the summed loss and its gradients.
    """
    if remote_top.head == "client" and head is None:
        raise ConfigError("head=client needs the data party's Head (the emulator's final norm and LM head)")

    def loss_fn(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        targets = next_token_targets(batch.labels)  # (B, T)
        count = int((targets != IGNORE_INDEX).sum())
        if not count:  # nothing to learn from: skip the round trip
            return kv.sum() * 0.0, 0
        x = wire_activations(bottom, batch.input_ids, batch.attention_mask, kv, split_at, privacy)
        top_kv = kv[split_at:]  # (L - K, 2, n_kv, P, hd)
        if head is None or remote_top.head == "server":
            return remote_top.loss(x, top_kv, targets), count
        return supervised_loss_sum(head, remote_top(x, top_kv), batch.labels)  # hidden (B, T, d)

    return loss_fn
