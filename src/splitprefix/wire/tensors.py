"""Tensors on the wire: one safetensors blob per message, control fields in its `__metadata__`.

Never pickle. Floating tensors travel in the wire dtype the client chose (fp32, bf16 or fp16) and
are cast back to fp32 on arrival; integer tensors (masks, positions) travel as int64. Decoding
checks the size limit before parsing and rejects NaN and Inf.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from splitprefix.errors import SplitPrefixError

WireDtype = Literal["fp32", "bf16", "fp16"]
WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
META_KEY = "splitprefix"
CONTENT_TYPE = "application/vnd.splitprefix.safetensors"


class WireFormatError(SplitPrefixError, ValueError):
    """A message is not a valid splitprefix blob; `status` and `code` go into the HTTP answer."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _DEFAULT_CODES.get(status, "bad_message")


_DEFAULT_CODES = {400: "bad_message", 413: "too_large", 422: "bad_tensor"}


def wire_dtype(name: str) -> torch.dtype:
    if not isinstance(name, str) or name not in WIRE_DTYPES:
        raise WireFormatError(
            f"wire_dtype must be one of {sorted(WIRE_DTYPES)}; got {name!r}", 422, "invalid_meta"
        )
    return WIRE_DTYPES[name]


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any], dtype: WireDtype = "fp32") -> bytes:
    """One blob holding `tensors` (floats cast to `dtype`) and `meta` as JSON metadata."""
    cast = wire_dtype(dtype)
    payload = {
        name: (t.detach().to(cast) if t.is_floating_point() else t.detach().long()).contiguous().cpu()
        for name, t in tensors.items()
    }
    return st_save(payload, metadata={META_KEY: json.dumps(meta)})


def decode(blob: bytes, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (floats as fp32) and metadata of a blob, or WireFormatError with a clear message."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise WireFormatError(f"message is {len(blob)} bytes; the limit is {max_bytes}", 413)
    try:
        tensors = st_load(blob)
        meta = json.loads(_metadata(blob).get(META_KEY, "{}"))
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise WireFormatError(f"body is not a splitprefix safetensors message: {error}") from None
    if not isinstance(meta, dict):
        raise WireFormatError(f"metadata must be a JSON object; got {type(meta).__name__}")
    out = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise WireFormatError(
                    f"tensor {name!r} contains NaN or Inf; check the data party's loss scale and inputs",
                    422,
                    "non_finite",
                )
            tensor = tensor.float()
        out[name] = tensor
    return out, meta


def _metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its JSON header), without loading tensors twice."""
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("header length exceeds the message")
    header = json.loads(blob[8 : 8 + size])
    return header.get("__metadata__") or {}


def payload_bytes(tensors: dict[str, torch.Tensor], dtype: WireDtype) -> int:
    """The tensors' own size on the wire: the floor that any encoding of them must pay."""
    size = WIRE_DTYPES[dtype].itemsize
    return sum(t.numel() * (size if t.is_floating_point() else 8) for t in tensors.values())
