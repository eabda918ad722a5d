"""Where a party computes: the torch device and the dtype of the frozen weights and activations.

Every data-party command takes one `RuntimeSettings` (`--device`, `--dtype`). The trainable prefix
and its optimiser state always stay in fp32, whatever the dtype of the frozen model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from splitprefix.errors import ConfigError

DtypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def check_device(device: str) -> torch.device:
    """`device` as a torch device, or a ConfigError that says which devices this machine has."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps; got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r}: this machine has no CUDA GPU that torch can use; pass --device cpu"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here; pass --device cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or mps; got {device!r}")
    return parsed


@dataclass(frozen=True)
class RuntimeSettings:
    """The device and compute dtype of one party's frozen model parts."""

    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N or mps."""
    dtype: DtypeName = "fp32"
    """Dtype of the frozen weights and activations: fp32, bf16 or fp16 (the prefix stays fp32)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        check_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
