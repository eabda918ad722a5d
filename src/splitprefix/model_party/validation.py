"""Checking a training request before it touches the model: metadata, tensor names, shapes, values.

Every failure is a `RequestError` with an HTTP status, a machine-readable code and a message that
states what was expected, what arrived and what to do. Codes:

    unsupported_protocol  422  protocol_version is not this server's
    invalid_meta          422  a metadata field is missing or has the wrong type
    head_not_enabled      422  the head mode asked for is not offered by this server
    split_mismatch        422  split_at is not this server's K
    fingerprint_mismatch  422  bottom_sha256 (or top_sha256) is not this model's bottom (top M layers)
    client_layers_not_allowed 422  client_layers M is over this server's max_client_layers, or not head=client
    bad_tensor            422  a tensor is missing, unexpected, or has the wrong shape, dtype or values
    wrong_route           422  a head=server step sent to forward/backward, or head=client to loss
    limit_exceeded        413  batch size or P + T is over the server's limit
    graph_missing         409  backward without inputs for a step whose graph the server does not hold
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from splitprefix.errors import SplitPrefixError
from splitprefix.model.registry import ModelDims
from splitprefix.wire.schemas import (
    FORWARD_INPUTS,
    GRAD_OUTPUT,
    IGNORE_TARGET,
    PROTOCOL_VERSION,
    TARGETS,
    HeadMode,
)
from splitprefix.wire.tensors import WIRE_DTYPES

MAX_STEP_ID_CHARS = 200


class RequestError(SplitPrefixError, ValueError):
    """A data party's request the server refuses; `status` and `code` go into the HTTP answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass(frozen=True)
class TopShape:
    """What the server's part expects from a request."""

    dims: ModelDims
    split_at: int
    bottom_sha256: str
    head_modes: list[HeadMode]
    max_batch_size: int
    max_tokens: int
    max_client_layers: int = 0
    top_sha256: dict[str, str] = field(default_factory=dict)
    """For each allowed M > 0 (as a string), the fingerprint of the model's last M layers."""

    @property
    def kv_layers(self) -> int:
        """Layers L - K of the prefix a request without client layers sends."""
        return self.dims.num_layers - self.split_at


@dataclass(frozen=True)
class StepMeta:
    """The control fields of one request."""

    step_id: str
    head: HeadMode
    wire_dtype: str
    keep_graph: bool
    grad: bool = True
    """Loss requests only: whether the answer carries gradients (false for evaluation)."""
    client_layers: int = 0
    """M: the data party keeps layers [L - M, L); this request runs [K, L - M)."""

    def reply(self, **extra: Any) -> dict[str, Any]:
        """The control fields of the answer to this request, plus `extra`."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "step_id": self.step_id,
            "head": self.head,
            "wire_dtype": self.wire_dtype,
            **extra,
        }


@dataclass(frozen=True)
class ForwardInputs:
    """The checked forward tensors; masks and positions as int64."""

    hidden: torch.Tensor  # (B, T, d)
    attention_mask: torch.Tensor  # (B, P + T)
    positions: torch.Tensor  # (B, T)
    prefix_kv: torch.Tensor  # (L - K, 2, n_kv, P, hd)

    @property
    def prefix_len(self) -> int:
        return self.prefix_kv.shape[3]


def check_meta(meta: dict[str, Any], top: TopShape, forward: bool) -> StepMeta:
    """The request's control fields; split_at and bottom_sha256 are required on forward only."""
    version = meta.get("protocol_version")
    if version != PROTOCOL_VERSION:
        raise RequestError(
            422,
            "unsupported_protocol",
            f"protocol_version must be {PROTOCOL_VERSION}; got {version!r}. Use a splitprefix client "
            f"that speaks protocol {PROTOCOL_VERSION}.",
        )
    step_id = meta.get("step_id")
    if not isinstance(step_id, str | int) or isinstance(step_id, bool) or not str(step_id):
        raise _meta_error("step_id", "a non-empty string", step_id)
    if len(str(step_id)) > MAX_STEP_ID_CHARS:
        raise _meta_error("step_id", f"at most {MAX_STEP_ID_CHARS} characters", f"{len(str(step_id))} chars")
    head = meta.get("head")
    if head not in ("server", "client"):
        raise _meta_error("head", "'server' or 'client'", head)
    if head not in top.head_modes:
        raise RequestError(
            422,
            "head_not_enabled",
            f"head={head} is not enabled on this server (it offers {top.head_modes}); ask for "
            f"head={top.head_modes[0]} or ask the model party to start the server with --head both",
        )
    wire = meta.get("wire_dtype")
    if not isinstance(wire, str) or wire not in WIRE_DTYPES:  # (a list is unhashable: a TypeError)
        raise _meta_error("wire_dtype", f"one of {sorted(WIRE_DTYPES)}", wire)
    flags = {name: meta.get(name, True) for name in ("keep_graph", "grad")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise _meta_error(name, "true or false", value)
    _check_model_identity(meta, top, forward)
    client_layers = _check_client_layers(meta, top, head)
    return StepMeta(str(step_id), head, wire, flags["keep_graph"], flags["grad"], client_layers)


def _check_client_layers(meta: dict[str, Any], top: TopShape, head: HeadMode) -> int:
    """M from the metadata (default 0), allowed by this server, with the fingerprint of those layers."""
    m = meta.get("client_layers", 0)
    if not isinstance(m, int) or isinstance(m, bool) or m < 0:
        raise _meta_error("client_layers", "an integer >= 0", m)
    if not m:
        return 0
    if head != "client" or m > top.max_client_layers:
        raise RequestError(
            422,
            "client_layers_not_allowed",
            f"client_layers={m} asks this server to stop at layer L - M = {top.dims.num_layers - m}; it allows "
            f"M <= {top.max_client_layers} (see /v1/info max_client_layers), with head=client only (got "
            f"head={head}). Ask the model party to serve with --max-client-layers {m}.",
        )
    if meta.get("top_sha256") != top.top_sha256.get(str(m)):
        raise RequestError(
            422,
            "fingerprint_mismatch",
            f"top_sha256 {str(meta.get('top_sha256'))[:12]}… is not the fingerprint of this model's last {m} "
            "layers: use an emulator the model party built from this model with --client-layers.",
        )
    return m


def check_head(step: StepMeta, expected: HeadMode, path: str) -> None:
    """Each training route serves one head mode: head=client steps forward and backward, head=server
    sends its loss requests to the loss route."""
    if step.head != expected:
        raise RequestError(
            422,
            "wrong_route",
            f"{path} serves head={expected} training steps; a head={step.head} step goes to "
            f"{'/v1/train/loss' if step.head == 'server' else '/v1/train/forward and /v1/train/backward'} "
            "(protocol 2)",
        )


def _check_model_identity(meta: dict[str, Any], top: TopShape, forward: bool) -> None:
    """split_at and bottom_sha256 must match when given; a forward must give them."""
    for name in ("split_at", "bottom_sha256"):
        if forward and name not in meta:
            raise _meta_error(name, "present in every forward request", None)
    if "split_at" in meta and meta["split_at"] != top.split_at:
        raise RequestError(
            422,
            "split_mismatch",
            f"this server runs layers [{top.split_at}, {top.dims.num_layers}), so split_at must be "
            f"{top.split_at}; got {meta['split_at']!r}. Use an emulator built with --split-at {top.split_at}.",
        )
    if "bottom_sha256" in meta and meta["bottom_sha256"] != top.bottom_sha256:
        raise RequestError(
            422,
            "fingerprint_mismatch",
            f"bottom_sha256 {str(meta['bottom_sha256'])[:12]}… is not this model's bottom "
            f"({top.bottom_sha256[:12]}…): your layers [0, {top.split_at}) come from another model. "
            "Use the emulator the model party built from this model.",
        )


def _meta_error(field: str, expected: str, actual: object) -> RequestError:
    return RequestError(422, "invalid_meta", f"metadata field {field!r} must be {expected}; got {actual!r}")


def has_forward_inputs(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a backward carries forward inputs (the stateless, recompute path)."""
    return any(name in tensors for name in FORWARD_INPUTS)


def check_names(tensors: dict[str, torch.Tensor], expected: list[str], what: str) -> None:
    """Exactly the tensors `expected`: a typo or a missing one is caught before any compute."""
    missing = [name for name in expected if name not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise RequestError(
            422,
            "bad_tensor",
            f"a {what} must carry exactly the tensors {expected}; missing {missing}, unexpected {extra}",
        )


def forward_names(head: HeadMode) -> list[str]:
    """The tensors of a head=client forward, or of a head=server loss request."""
    return [*FORWARD_INPUTS, TARGETS] if head == "server" else list(FORWARD_INPUTS)


def check_forward_inputs(
    tensors: dict[str, torch.Tensor], top: TopShape, client_layers: int = 0
) -> ForwardInputs:
    """Forward tensors with consistent shapes, dtypes and values, within the server's limits; the
    prefix covers the layers [K, L - M) this request runs."""
    hidden = _floating(tensors, "hidden")
    kv = _floating(tensors, "prefix_kv")
    d, n_kv, hd = top.dims.hidden_size, top.dims.num_kv_heads, top.dims.head_dim
    if hidden.ndim != 3 or hidden.shape[2] != d or 0 in hidden.shape[:2]:
        _bad_shape("hidden", f"(B, T, {d}) with B, T >= 1", hidden)
    batch, length = hidden.shape[:2]
    layers = top.kv_layers - client_layers
    if kv.ndim != 5 or (kv.shape[:3], kv.shape[4]) != ((layers, 2, n_kv), hd):
        _bad_shape("prefix_kv", f"(L - M - K, 2, n_kv, P, head_dim) = ({layers}, 2, {n_kv}, P, {hd})", kv)
    prefix = kv.shape[3]
    _check_limits(batch, prefix + length, top)
    mask = _integer(
        tensors, "attention_mask", (batch, prefix + length), f"(B, P + T) = ({batch}, {prefix} + {length})"
    )
    _binary(mask, "attention_mask")
    positions = _integer(tensors, "positions", (batch, length), f"(B, T) = ({batch}, {length})")
    if not positions.is_meta and (positions < 0).any():
        raise RequestError(422, "bad_tensor", "positions must be >= 0")
    return ForwardInputs(hidden, mask, positions, kv)


def check_targets(tensors: dict[str, torch.Tensor], inputs: ForwardInputs, vocab_size: int) -> torch.Tensor:
    """A loss request's targets (B, T): token ids in [0, V), or -100 where there is no loss."""
    batch, length = inputs.hidden.shape[:2]
    targets = _integer(tensors, TARGETS, (batch, length), f"(B, T) = ({batch}, {length})")
    bad = (targets != IGNORE_TARGET) & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        raise RequestError(
            422,
            "bad_tensor",
            f"targets must be token ids in [0, {vocab_size}) or {IGNORE_TARGET}; got "
            f"{targets[bad].unique().tolist()[:8]}",
        )
    real = inputs.attention_mask[:, inputs.prefix_len :].bool()
    if ((targets != IGNORE_TARGET) & ~real).any():
        raise RequestError(422, "bad_tensor", "targets must be -100 on padding (attention_mask 0)")
    return targets


def check_grad_output(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The backward's incoming gradient, shaped like the forward's output."""
    grad = _floating(tensors, GRAD_OUTPUT)
    if tuple(grad.shape) != shape:
        _bad_shape(GRAD_OUTPUT, f"the forward output's shape {shape}", grad)
    return grad


def _check_limits(batch: int, tokens: int, top: TopShape) -> None:
    if batch > top.max_batch_size:
        raise RequestError(
            413,
            "limit_exceeded",
            f"batch size {batch} is over this server's limit of {top.max_batch_size}; split the batch "
            "into micro-batches (see /v1/info limits)",
        )
    if tokens > top.max_tokens:
        raise RequestError(
            413,
            "limit_exceeded",
            f"P + T = {tokens} prefix and tokens per sequence is over this server's limit of "
            f"{top.max_tokens}; use shorter sequences (see /v1/info limits)",
        )


def _floating(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    tensor = tensors[name]
    if not tensor.is_floating_point():
        raise RequestError(
            422, "bad_tensor", f"{name} must be a floating tensor (fp32, bf16 or fp16); got {tensor.dtype}"
        )
    return tensor


def _integer(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], text: str) -> torch.Tensor:
    tensor = tensors[name]
    if tensor.is_floating_point() or tensor.is_complex():
        raise RequestError(422, "bad_tensor", f"{name} must be an integer tensor (int64); got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        _bad_shape(name, text, tensor)
    return tensor.long()


def _binary(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_meta:  # declared in a header only (model_party.admission): values come with decoding
        return
    if ((tensor != 0) & (tensor != 1)).any():
        raise RequestError(
            422, "bad_tensor", f"{name} must hold only 0 and 1; got values {tensor.unique().tolist()[:8]}"
        )


def _bad_shape(name: str, expected: str, tensor: torch.Tensor) -> NoReturn:
    raise RequestError(422, "bad_tensor", f"{name} must have shape {expected}; got {tuple(tensor.shape)}")
