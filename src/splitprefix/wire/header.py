"""A message's safetensors header, read and checked before a single tensor is decoded.

A safetensors blob starts with an 8-byte little-endian length and a JSON header that names every
tensor with its dtype, shape and byte range. Reading it costs a small JSON parse, so a server can
refuse a message whose tensors have the wrong names, dtypes or shapes, or are larger than its
limits allow, without copying, casting or scanning their data. `header_tensors` gives the declared
tensors as storage-free tensors on torch's `meta` device, on which the usual shape checks run.

The byte ranges are checked against the message's length, so the declared shapes are the ones
that decoding will produce.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from splitprefix.wire.tensors import META_KEY, WireFormatError

MAX_HEADER_BYTES = 1 << 20
"""A header is a few hundred bytes of names, shapes and metadata; anything near this is not ours."""
DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""Safetensors dtypes a message may use: the wire's floats and integers (others are refused)."""


@dataclass(frozen=True)
class Declared:
    """One tensor as the header declares it."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """The declared tensors of a message and its splitprefix metadata."""

    tensors: dict[str, Declared]
    meta: dict[str, Any]


def read_header(blob: bytes) -> Header:
    """The header of `blob`, or WireFormatError (400 bad_message, 422 bad_tensor) saying what is wrong."""
    if len(blob) < 8:
        raise _garbled("it is shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise _garbled(f"its header claims {size} bytes of a {len(blob)}-byte message")
    try:
        raw = json.loads(blob[8 : 8 + size])
    except (ValueError, UnicodeDecodeError) as error:
        raise _garbled(f"its header is not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise _garbled("its header is not a JSON object")
    meta = _meta(raw.pop("__metadata__", None))
    tensors = {str(name): _declared(str(name), entry) for name, entry in raw.items()}
    data = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors.values())
    if data != len(blob) - 8 - size:
        raise _garbled(f"its tensors declare {data} bytes of data; it carries {len(blob) - 8 - size}")
    return Header(tensors, meta)


def header_tensors(header: Header) -> dict[str, torch.Tensor]:
    """The declared tensors on the `meta` device: right dtype and shape, no data, no memory."""
    return {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in header.tensors.items()}


def _declared(name: str, entry: Any) -> Declared:
    if not isinstance(entry, dict):
        raise _garbled(f"its header entry for {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        raise _garbled(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(n) for n in offsets)):
        raise _garbled(f"tensor {name!r} has data_offsets {offsets!r}")
    if dtype not in DTYPES:
        raise WireFormatError(
            f"tensor {name!r} has dtype {dtype!r}; send floats as F32, BF16 or F16 and integers as I64",
            422,
            "bad_tensor",
        )
    declared = Declared(DTYPES[dtype], tuple(shape))
    if offsets[1] - offsets[0] != math.prod(declared.shape) * declared.dtype.itemsize:
        raise _garbled(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, not its shape's")
    return declared


def _meta(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not isinstance(raw.get(META_KEY, "{}"), str):
        raise _garbled("its __metadata__ is not a map of strings")
    try:
        meta = json.loads(raw.get(META_KEY, "{}"))
    except ValueError as error:
        raise _garbled(f"its {META_KEY} metadata is not JSON ({error})") from None
    if not isinstance(meta, dict):
        raise WireFormatError(f"metadata must be a JSON object; got {type(meta).__name__}")
    return meta


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _garbled(why: str) -> WireFormatError:
    return WireFormatError(f"body is not a splitprefix safetensors message: {why}")
