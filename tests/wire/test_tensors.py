"""Wire encoding: safetensors blobs with JSON metadata, dtype casting, limits, NaN rejection."""

from __future__ import annotations

import pytest
import torch

from splitprefix.wire.tensors import WireFormatError, decode, encode, payload_bytes


@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 0.0), ("bf16", 1e-2), ("fp16", 1e-3)])
def test_round_trip_casts_floats_and_keeps_integers(dtype, tol):
    hidden = torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 0]])
    tensors, meta = decode(encode({"hidden": hidden, "mask": mask}, {"step_id": "a", "n": 1}, dtype))
    assert meta == {"step_id": "a", "n": 1}
    assert tensors["hidden"].dtype == torch.float32 and tensors["mask"].dtype == torch.int64
    torch.testing.assert_close(tensors["hidden"], hidden, atol=tol * 4, rtol=tol)
    assert torch.equal(tensors["mask"], mask)


def test_blob_size_is_close_to_the_payload():
    tensors = {"hidden": torch.randn(4, 16, 64)}
    assert len(encode(tensors, {}, "bf16")) < payload_bytes(tensors, "bf16") + 256


@pytest.mark.parametrize("bad", [b"", b"12345678garbage", b"\xff" * 100])
def test_garbage_is_rejected_with_400(bad):
    with pytest.raises(WireFormatError, match="not a splitprefix safetensors message") as info:
        decode(bad)
    assert info.value.status == 400


def test_oversized_message_is_rejected_with_413():
    with pytest.raises(WireFormatError, match="limit is 10") as info:
        decode(encode({"x": torch.zeros(10)}, {}), max_bytes=10)
    assert info.value.status == 413


def test_non_finite_values_are_rejected_with_422():
    with pytest.raises(WireFormatError, match="'x' contains NaN or Inf") as info:
        decode(encode({"x": torch.tensor([1.0, float("nan")])}, {}))
    assert info.value.status == 422


def test_unknown_wire_dtype_is_rejected():
    with pytest.raises(WireFormatError, match="wire_dtype must be one of"):
        encode({"x": torch.zeros(1)}, {}, "int8")  # type: ignore[arg-type]
