"""`RemoteTop`: the server's layers [K, L) as if they were local.

Its forward and backward cross the network through a `torch.autograd.Function` (one HTTP call
each, through `SplitClient`), so the training loop stays ordinary PyTorch.
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
    """Forward and backward of the server's layers, each one HTTP call."""

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
        output = client.forward(inputs, step_id, keep_graph)
        # the inputs are kept even when the server holds the graph: a restart makes us resend them
        ctx.client, ctx.step_id, ctx.inputs = client, step_id, inputs
        # wire tensors arrive on the CPU in fp32; hand them back where and as the inputs were
        ctx.places = ((hidden.device, hidden.dtype), (top_kv.device, top_kv.dtype))
        return output.to(hidden.device, hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_kv = ctx.client.backward(ctx.step_id, grad_output, ctx.inputs)
        (hidden_device, hidden_dtype), (kv_device, kv_dtype) = ctx.places
        ctx.inputs = None
        return None, grad_hidden.to(hidden_device, hidden_dtype), grad_kv.to(kv_device, kv_dtype), None, None


class RemoteTop(nn.Module):
    """The server's layers [K, L) (and its head, with head=server) as a local module."""

    def __init__(self, client: SplitClient) -> None:
        super().__init__()
        self.client = client

    @property
    def head(self) -> HeadMode:
        return self.client.settings.head

    def forward(
        self, x: Activations, top_kv: torch.Tensor, supervised: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`top_kv` (L-K, 2, n_kv, P, hd); `supervised` (B, T), head=server only.

        Returns head=client: hidden states (B, T, d) before the final norm; head=server: logits
        (N, V) at the N supervised positions in row-major order.
        """
        if (supervised is None) != (self.head == "client"):
            raise ConfigError(f"supervised positions are needed with head=server only; head={self.head!r}")
        inputs = {
            "hidden": x.hidden.detach(),  # (B, T, d)
            "attention_mask": x.attention_mask,  # (B, P + T)
            "positions": x.positions,  # (B, T)
            "prefix_kv": top_kv.detach(),  # (L - K, 2, n_kv, P, hd)
        }
        if supervised is not None:
            inputs[schemas.SUPERVISED] = supervised.long()  # (B, T)
        wants_grad = torch.is_grad_enabled() and (x.hidden.requires_grad or top_kv.requires_grad)
        # without a backward to come, the server need not hold a graph
        keep_graph = wants_grad and self.client.settings.keep_graph
        output = _RemoteTopFunction.apply(self.client, x.hidden, top_kv, inputs, keep_graph)
        return output
