"""What the curious model party observes: the wire tensors of a data party's examples.

`LocalTop` runs the model party's layers in this process behind the same interface as
`RemoteTop`, so the data party's own code (`split_loss_fn`, `wire_activations`) produces exactly
the tensors it would send. Split against whole is tested equal elsewhere, so no server is needed to
measure what one would see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from splitprefix.data.batching import IGNORE_INDEX, EncodedExample
from splitprefix.data_party.privacy import HiddenPrivacy
from splitprefix.data_party.split_forward import wire_activations
from splitprefix.model.prefix import prefix_cache
from splitprefix.model.split import Activations, Bottom, Top
from splitprefix.wire.schemas import HeadMode


class LocalTop(nn.Module):
    """Layers [K, L - M) (and the head and loss, for head=server) of the full model, called like `RemoteTop`.

    `seen_targets` keeps every head=server request's targets (B, T): they travel in the clear.
    """

    def __init__(
        self, model: PreTrainedModel, split_at: int, head: HeadMode = "client", client_layers: int = 0
    ) -> None:
        super().__init__()
        self.top = Top(model, split_at, head, client_layers)  # layers [K, L - M)
        self.split_at, self._head = split_at, head
        self.seen_targets: list[torch.Tensor] = []

    @property
    def head(self) -> HeadMode:
        return self._head

    def forward(self, x: Activations, top_kv: torch.Tensor) -> torch.Tensor:
        """head=client: hidden states (B, T, d) after layer L - M; head=server: logits (B, T, V)."""
        weight = next(self.top.parameters())
        device, dtype = weight.device, weight.dtype
        # as the server does: what arrives is cast to its device and dtype (differentiably: grads reach kv)
        top_kv = top_kv.to(device, dtype)
        x = Activations(x.hidden.to(device, dtype), x.attention_mask.to(device), x.positions.to(device))
        batch, p = x.hidden.shape[0], top_kv.shape[3]
        config = self.top.stack.config
        cache = prefix_cache(top_kv, config, batch, first_layer=self.split_at) if p else None
        return self.top(x, cache)

    def loss(self, x: Activations, top_kv: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """head=server: the summed cross-entropy of `targets` (B, T), as the server computes it."""
        self.seen_targets.append(targets.detach())  # as the request carries them
        targets = targets.to(next(self.top.parameters()).device)
        supervised = targets != IGNORE_INDEX
        logits = self(x, top_kv)[supervised]  # (N, V)
        return F.cross_entropy(logits.float(), targets[supervised], reduction="sum")


@dataclass
class Observation:
    """One example as the model party sees it: no padding, batch of one."""

    token_ids: torch.Tensor
    """The true input tokens (T,): what the attacker tries to recover, never sent."""
    hidden: torch.Tensor
    """The layer-K states as sent (T, d), in fp32 on the bottom's device."""
    positions: torch.Tensor
    """The position ids as sent (T,), on the bottom's device."""


@torch.no_grad()
def observe(
    bottom: Bottom,
    encoded: list[EncodedExample],
    kv: torch.Tensor,
    split_at: int,
    privacy: HiddenPrivacy | None,
) -> list[Observation]:
    """The wire states of each example, sent alone, with the data party's prefix `kv` (L, 2, n_kv, P, hd)."""
    seen = []
    for example in encoded:
        ids = torch.tensor([example.input_ids])  # (1, T)
        mask = torch.ones_like(ids)
        x = wire_activations(bottom, ids, mask, kv, split_at, privacy)
        seen.append(Observation(ids[0], x.hidden[0].float(), x.positions[0]))
    return seen


def first_tokens(observations: list[Observation], max_tokens: int) -> list[Observation]:
    """The leading observations that together hold at most `max_tokens` tokens (at least one)."""
    kept: list[Observation] = []
    total = 0
    for obs in observations:
        if kept and total + len(obs.token_ids) > max_tokens:
            break
        kept.append(obs)
        total += len(obs.token_ids)
    return kept
