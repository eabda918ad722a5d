"""Refusing a message from its safetensors header, before any of its tensors is decoded.

Decoding copies every tensor, scans its floats for NaN and casts them to fp32: for a body near
`max_request_bytes` that is several times its size in memory and time. A message with the wrong
tensor names, dtypes or shapes, or one over the batch and token limits, is refused from the
header alone (`wire.header`), with the same status, code and detail the checks after decoding
give. Those checks still run on the decoded tensors: values (NaN, masks of 0 and 1, positions)
and everything that depends on the server's state (a held graph's shape, a session's rows) are
only known then.

Each route of the app names its check by its path; a route without one gets the checks that hold
for every message: floats for float tensors, integers for masks and positions, and shapes within
the limits in /v1/info.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import torch

from splitprefix.model_party.validation import (
    RequestError,
    TopShape,
    check_forward_inputs,
    check_head,
    check_meta,
    check_names,
    forward_names,
    has_forward_inputs,
)
from splitprefix.wire import schemas
from splitprefix.wire.header import header_tensors, read_header

Tensors = dict[str, torch.Tensor]
FLOATS = ("hidden", schemas.PREFIX_KV, schemas.GRAD_OUTPUT)
INTEGERS = ("attention_mask", "positions", schemas.TARGETS, "token_mask")


class Admission:
    """The header checks of each route of one server (its model's sizes and its limits)."""

    def __init__(self, top: TopShape) -> None:
        self.top = top
        self._routes: dict[str, Callable[[Tensors, dict[str, Any]], None]] = {
            schemas.FORWARD_PATH: self._forward,
            schemas.BACKWARD_PATH: self._backward,
            schemas.LOSS_PATH: self._loss,
            schemas.SESSIONS_PATH: self._open,
            schemas.SESSION_STEP_PATH: self._step,
        }

    def check(self, route: str, body: bytes) -> None:
        """Raise the RequestError or WireFormatError that `body` earns at `route` (a path template)."""
        header = read_header(body)
        tensors = header_tensors(header)  # (declared shapes on the meta device: no data)
        route_check = self._routes.get(route)
        if route_check is not None:
            route_check(tensors, header.meta)
        for name, tensor in tensors.items():
            _check_kind(name, tensor)
            self._check_size(name, tensor)

    def _forward(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        step = check_meta(meta, self.top, forward=True)
        check_head(step, "client", schemas.FORWARD_PATH)
        check_names(tensors, forward_names(step.head), "forward request")
        check_forward_inputs(tensors, self.top, step.client_layers)

    def _backward(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        step = check_meta(meta, self.top, forward=False)
        check_head(step, "client", schemas.BACKWARD_PATH)
        recompute = has_forward_inputs(tensors)
        expected = [*forward_names(step.head), schemas.GRAD_OUTPUT] if recompute else [schemas.GRAD_OUTPUT]
        check_names(tensors, expected, "backward request")
        if recompute:
            check_forward_inputs(tensors, self.top, step.client_layers)

    def _loss(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        step = check_meta(meta, self.top, forward=True)
        check_head(step, "server", schemas.LOSS_PATH)
        check_names(tensors, forward_names(step.head), "loss request")
        inputs = check_forward_inputs(tensors, self.top)
        rows = tuple(inputs.hidden.shape[:2])
        if tuple(tensors[schemas.TARGETS].shape) != rows:
            _bad_shape(schemas.TARGETS, f"(B, T) = {rows}", tuple(tensors[schemas.TARGETS].shape))

    def _open(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        check_meta(meta, self.top, forward=True)
        check_names(tensors, [*schemas.GENERATE_INPUTS, schemas.PREFIX_KV], "generation open request")

    def _step(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        check_meta(meta, self.top, forward=False)
        if set(tensors) != {"hidden"}:  # hidden alone is the implicit one-token step
            check_names(tensors, list(schemas.GENERATE_INPUTS), "generation step request")

    def _check_size(self, name: str, tensor: torch.Tensor) -> None:
        """The shape rules that hold for `name` in every message, whatever the server's state."""
        top, shape = self.top, tuple(tensor.shape)
        d = top.dims.hidden_size
        if name == "hidden":
            if tensor.ndim != 3 or shape[2] != d or 0 in shape[:2]:
                _bad_shape(name, f"(B, T, {d}) with B, T >= 1", shape)
            _within(shape[0], shape[1], top)
        elif name == schemas.PREFIX_KV:
            # L - K layers, less the M a U-shaped split keeps at the data party (the route checks M)
            fewest, expected = top.kv_layers - top.max_client_layers, (2, top.dims.num_kv_heads)
            if (
                tensor.ndim != 5
                or not fewest <= shape[0] <= top.kv_layers
                or (shape[1:3], shape[4])
                != (
                    expected,
                    top.dims.head_dim,
                )
            ):
                layers = str(top.kv_layers) if not top.max_client_layers else f"{fewest}..{top.kv_layers}"
                _bad_shape(
                    name, f"(L - K - M, 2, n_kv, P, head_dim) = ({layers}, 2, {expected[1]}, P, ..)", shape
                )
            _within(1, shape[3], top)
        elif name in INTEGERS:
            if tensor.ndim != 2:
                _bad_shape(name, "(B, T)", shape)
            _within(shape[0], shape[1], top)
        elif name == schemas.GRAD_OUTPUT:
            if tensor.ndim != 3 or shape[2] != d:
                _bad_shape(name, f"(B, T, {d}), the shape of the forward's output", shape)
            _within(shape[0], shape[1], top)


def _check_kind(name: str, tensor: torch.Tensor) -> None:
    if name in FLOATS and not tensor.is_floating_point():
        raise RequestError(
            422, "bad_tensor", f"{name} must be a floating tensor (fp32, bf16 or fp16); got {tensor.dtype}"
        )
    if name in INTEGERS and tensor.is_floating_point():
        raise RequestError(422, "bad_tensor", f"{name} must be an integer tensor (int64); got {tensor.dtype}")


def _within(batch: int, tokens: int, top: TopShape) -> None:
    if batch > top.max_batch_size:
        raise RequestError(
            413,
            "limit_exceeded",
            f"batch size {batch} is over this server's limit of {top.max_batch_size}; send fewer rows per "
            "request (see /v1/info limits)",
        )
    if tokens > top.max_tokens:
        raise RequestError(
            413,
            "limit_exceeded",
            f"{tokens} positions per row is over this server's limit of {top.max_tokens} (max_tokens in "
            "/v1/info); use shorter sequences",
        )


def _bad_shape(name: str, expected: str, shape: tuple[int, ...]) -> NoReturn:
    raise RequestError(422, "bad_tensor", f"{name} must have shape {expected}; got {shape}")
