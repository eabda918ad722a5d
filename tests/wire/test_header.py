"""Reading a message's safetensors header without decoding its tensors."""

from __future__ import annotations

import pytest
import torch

from splitprefix.wire.header import MAX_HEADER_BYTES, header_tensors, read_header
from splitprefix.wire.tensors import WireFormatError, encode


def test_the_header_declares_what_decoding_gives():
    # Prepare
    blob = encode(
        {"hidden": torch.randn(2, 3, 8), "mask": torch.ones(2, 5, dtype=torch.long)}, {"a": 1}, "bf16"
    )

    # Execute
    header = read_header(blob)
    declared = header_tensors(header)

    # Assert
    assert header.meta == {"a": 1}
    assert {n: (t.dtype, tuple(t.shape)) for n, t in declared.items()} == {
        "hidden": (torch.bfloat16, (2, 3, 8)),
        "mask": (torch.int64, (2, 5)),
    }
    assert all(t.is_meta for t in declared.values())


@pytest.mark.parametrize(
    ("blob", "pattern"),
    [
        (b"\x05\0\0", "shorter than a safetensors header"),
        ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}" * MAX_HEADER_BYTES, "header claims"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((4).to_bytes(8, "little") + b"{]}x", "not JSON"),
    ],
)
def test_a_garbled_header_is_a_bad_message(blob, pattern):
    with pytest.raises(WireFormatError, match=pattern) as raised:
        read_header(blob)
    assert (raised.value.status, raised.value.code) == (400, "bad_message")
