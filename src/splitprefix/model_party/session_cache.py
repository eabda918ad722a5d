"""A generation session's keys and values, preallocated at its reserved `max_length`.

The session's memory is reserved when it opens, so it is also allocated then: one buffer of keys
and one of values per server layer, (B, heads, max_length, width), and the mask of every cached
key. A step writes its new keys in place instead of concatenating a longer cache every token.

A forward runs on a transformers `DynamicCache` whose full-attention layers are `InPlaceLayer`s:
their `update` writes the new tokens' keys into a preallocated buffer and returns views of it,
where a `DynamicLayer` would concatenate a copy of every earlier key. `padded_cache` builds it:

- one session alone: each layer is a view of the session's own buffers, so the step copies no
  earlier key, and its new keys land in the session directly;
- several sessions: one buffer per layer holds them row after row, each right-aligned to the
  longest and left-padded with masked zeros, which copies each session's keys once.

Padding keys are masked and every row keeps its own positions, so a row sees exactly the keys it
would see alone. `SessionCache.take` then copies the new tokens' keys back (for a session alone,
onto themselves). A sliding-window layer keeps transformers' own layer, which keeps only its
window; `take` writes what it kept, and the older, unwritten slots are never inside a window again.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

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

    def padded_mask(self, length: int) -> torch.Tensor:
        """(B, length): the key mask right-aligned after zeros."""
        pad = length - self.length
        return torch.nn.functional.pad(self.mask, (pad, 0)) if pad else self.mask


class InPlaceLayer(DynamicLayer):
    """A full-attention layer's cache in preallocated buffers (B, h, capacity, w) of which the first
    `length` slots are cached keys: `update` writes the new keys after them and returns views."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.buffers = (keys, values)
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.buffers
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if end > keys.shape[2]:
            raise ValueError(f"the cache holds {keys.shape[2]} keys per row; this step needs {end}")
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


def padded_cache(config: PretrainedConfig, parts: list[SessionCache], length: int, new: int) -> DynamicCache:
    """One cache holding the rows of every part in turn, each left-padded to `length` keys, with
    room for `new` more keys per row in its full-attention layers."""
    cache = DynamicCache(config=config)
    first = parts[0].first
    alone = len(parts) == 1  # then its length is `length`
    for j in range(len(parts[0].keys)):
        at = first + j
        if alone:  # views of the session's own buffers
            keys, values = parts[0].keys[j], parts[0].values[j]
        else:  # one copy of every part, with room for the new keys
            keys = _stacked(parts, [part.keys[j] for part in parts], length, length + new)
            values = _stacked(parts, [part.values[j] for part in parts], length, length + new)
        if type(cache.layers[at]) is DynamicLayer:
            cache.layers[at] = InPlaceLayer(keys, values, length)
        else:  # a sliding window: transformers' own layer, which keeps the window of what it gets
            cache.update(keys[:, :, :length], values[:, :, :length], at)
    return cache


def _stacked(
    parts: list[SessionCache], buffers: list[torch.Tensor], length: int, capacity: int
) -> torch.Tensor:
    """Each part's cached rows of its buffer (B_i, h, max_length, w) in one (R, h, capacity, w),
    ending at slot `length` after zeros."""
    first = buffers[0]
    stacked = first.new_zeros(sum(b.shape[0] for b in buffers), first.shape[1], capacity, first.shape[3])
    start = 0
    for part, buffer in zip(parts, buffers, strict=True):
        rows = slice(start, start + buffer.shape[0])
        stacked[rows, :, length - part.length : length] = buffer[:, :, : part.length]
        start += buffer.shape[0]
    return stacked
