"""A generation session's keys and values, preallocated at its reserved `max_length`.

The session's memory is reserved when it opens, so it is also allocated then: one buffer of keys
and one of values per server layer, (B, heads, max_length, width), and the mask of every cached
key. A step writes its new keys in place instead of concatenating a longer cache every token.

A forward still runs on a transformers `DynamicCache`: `padded_cache` fills one for several
sessions at once, each right-aligned to the longest and left-padded with masked zeros, and
`SessionCache.take` copies the new tokens' keys back. Padding keys are masked, and every row
keeps its own positions, so a row sees exactly the keys it would see alone. A sliding-window
layer's `DynamicCache` keeps only its window; `take` then writes what it kept, and the older,
unwritten slots are never inside a window again.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig

from splitprefix.model.registry import ModelDims


class SessionCache:
    """Keys, values and key mask of layers [first, first + n) for B rows, up to `max_length` keys."""

    def __init__(
        self,
        dims: ModelDims,
        first: int,
        layers: int,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        """`shape` = (B, max_length)."""
        batch, max_length = shape
        self.first = first
        kv = dims.layer_kv[first : first + layers]
        self.keys = [
            torch.zeros(batch, k.num_kv_heads, max_length, k.key_dim, dtype=dtype, device=device) for k in kv
        ]
        self.values = [
            torch.zeros(batch, k.num_kv_heads, max_length, k.value_dim, dtype=dtype, device=device)
            for k in kv
        ]
        self.key_mask = torch.zeros(batch, max_length, dtype=torch.long, device=device)  # (B, max_length)
        self.length = 0

    @property
    def mask(self) -> torch.Tensor:
        """(B, S): 1 for every cached key the next tokens may attend to."""
        return self.key_mask[:, : self.length]

    def take(self, cache: DynamicCache, rows: slice, new_mask: torch.Tensor) -> None:
        """Append the last T keys of `rows` of each layer of `cache` (after a forward) and `new_mask` (B, T)."""
        new = new_mask.shape[1]
        end = self.length + new
        for j, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            layer: Any = cache.layers[self.first + j]  # a DynamicLayer or DynamicSlidingWindowLayer
            kept = min(new, layer.keys.shape[2])  # a sliding layer keeps its window only
            keys[:, :, end - kept : end] = layer.keys[rows, :, -kept:]
            values[:, :, end - kept : end] = layer.values[rows, :, -kept:]
        self.key_mask[:, self.length : end] = new_mask
        self.length = end

    def padded(self, length: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j's keys and values (B, h, length, w): the cached ones right-aligned after zeros."""
        keys, values = self.keys[j][:, :, : self.length], self.values[j][:, :, : self.length]
        pad = length - self.length
        if not pad:
            return keys, values
        return _left_pad(keys, pad), _left_pad(values, pad)

    def padded_mask(self, length: int) -> torch.Tensor:
        """(B, length): the key mask right-aligned after zeros."""
        pad = length - self.length
        return torch.nn.functional.pad(self.mask, (pad, 0)) if pad else self.mask


def _left_pad(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    zeros = tensor.new_zeros(*tensor.shape[:2], pad, tensor.shape[3])
    return torch.cat([zeros, tensor], dim=2)


def padded_cache(config: PretrainedConfig, parts: list[SessionCache], length: int) -> DynamicCache:
    """One cache holding the rows of every part in turn, each left-padded to `length` keys."""
    cache = DynamicCache(config=config)
    first = parts[0].first
    for j in range(len(parts[0].keys)):
        pairs = [part.padded(length, j) for part in parts]
        keys = pairs[0][0] if len(pairs) == 1 else torch.cat([k for k, _ in pairs])  # (R, h, length, w)
        values = pairs[0][1] if len(pairs) == 1 else torch.cat([v for _, v in pairs])
        cache.update(keys, values, first + j)
    return cache
