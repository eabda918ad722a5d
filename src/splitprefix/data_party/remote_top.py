"""`RemoteTop`: the server's layers [K, L) as if they were local.

Its forward and backward cross the network through a `torch.autograd.Function` (with head=client
one HTTP call each; with head=server one call for the loss and its gradients), through
`SplitClient`, so the training loop stays ordinary PyTorch.
"""

from __future__ import annotations

import uuid
from typing import Any

import torch
from torch import nn

from splitprefix.data_party.remote import SplitClient
from splitprefix.errors import ConfigError
from splitprefix.model.split import Activations
from splitprefix.wire import schemas
from splitprefix.wire.schemas import HeadMode


class _RemoteTopFunction(torch.autograd.Function):
    """head=client: forward and backward of the server's layers, each one HTTP call."""

    @staticmethod
    def forward(
        ctx: Any,
        client: SplitClient,
        hidden: torch.Tensor,
        top_kv: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        keep_graph: bool,
    ) -> torch.Tensor:
        step_id = uuid.uuid4().hex
        output, held = client.forward(inputs, step_id, keep_graph)
        # the inputs are kept even when the server holds the graph: a restart makes us resend them
        ctx.client, ctx.step_id, ctx.inputs, ctx.held = client, step_id, inputs, held
        ctx.places = _places(hidden, top_kv)
        return output.to(hidden.device, hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_kv = ctx.client.backward(ctx.step_id, grad_output, ctx.inputs, ctx.held)
        ctx.inputs = None
        return None, *_placed(ctx.places, grad_hidden, grad_kv), None, None


class _RemoteLossFunction(torch.autograd.Function):
    """head=server: the server's layers, head and loss in one HTTP call, which also returns the
    gradients; the backward only scales them by the incoming gradient of the loss."""

    @staticmethod
    def forward(
        ctx: Any,
        client: SplitClient,
        hidden: torch.Tensor,
        top_kv: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        grad: bool,
    ) -> torch.Tensor:
        loss, grads = client.loss(inputs, uuid.uuid4().hex, grad)
        ctx.grads = _placed(_places(hidden, top_kv), *grads.values()) if grad else None
        return loss.to(hidden.device)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        if ctx.grads is None:
            raise RuntimeError("bug: backward through a loss computed without gradients")
        grad_hidden, grad_kv = ctx.grads
        ctx.grads = None
        return None, grad_hidden * grad_loss, grad_kv * grad_loss, None, None


def _places(*tensors: torch.Tensor) -> tuple[tuple[torch.device, torch.dtype], ...]:
    return tuple((t.device, t.dtype) for t in tensors)


def _placed(
    places: tuple[tuple[torch.device, torch.dtype], ...], *tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Wire tensors arrive on the CPU in fp32; hand them back where and as the inputs were."""
    return tuple(t.to(device, dtype) for t, (device, dtype) in zip(tensors, places, strict=True))


class RemoteTop(nn.Module):
    """The server's layers [K, L) (and its head and loss, with head=server) as a local module."""

    def __init__(self, client: SplitClient) -> None:
        super().__init__()
        self.client = client

    @property
    def head(self) -> HeadMode:
        return self.client.settings.head

    def forward(self, x: Activations, top_kv: torch.Tensor) -> torch.Tensor:
        """head=client: `top_kv` (L-K, 2, n_kv, P, hd) in, the last hidden states (B, T, d) out."""
        if self.head != "client":
            raise ConfigError("with head=server the server computes the loss: call RemoteTop.loss")
        keep_graph = _wants_grad(x, top_kv) and self.client.settings.keep_graph
        # without a backward to come, the server need not hold a graph
        return _RemoteTopFunction.apply(self.client, x.hidden, top_kv, _inputs(x, top_kv), keep_graph)

    def loss(self, x: Activations, top_kv: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """head=server: the summed cross-entropy () of `targets` (B, T) (-100 = no loss)."""
        if self.head != "server":
            raise ConfigError("with head=client the data party computes the loss: call RemoteTop(x, kv)")
        inputs = _inputs(x, top_kv) | {schemas.TARGETS: targets.long()}  # (B, T)
        return _RemoteLossFunction.apply(self.client, x.hidden, top_kv, inputs, _wants_grad(x, top_kv))


def _inputs(x: Activations, top_kv: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "hidden": x.hidden.detach(),  # (B, T, d)
        "attention_mask": x.attention_mask,  # (B, P + T)
        "positions": x.positions,  # (B, T)
        "prefix_kv": top_kv.detach(),  # (L - K, 2, n_kv, P, hd)
    }


def _wants_grad(x: Activations, top_kv: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.hidden.requires_grad or top_kv.requires_grad)
