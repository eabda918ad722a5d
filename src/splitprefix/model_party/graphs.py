"""Forward graphs the server holds until their backward arrives: per client, short-lived, capped.

A dropped graph costs only time: the backward then answers 409 `graph_missing` and the client
resends it with the forward inputs, so the server recomputes. That makes every cap safe to hit.
Expiry is checked on every store access; an idle server keeps at most `max_bytes` until then.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class HeldGraph:
    """The live autograd graph of one forward, from its inputs to its output."""

    output: torch.Tensor
    """The forward's output, still attached to the graph."""
    inputs: tuple[torch.Tensor, torch.Tensor]
    """The leaves whose gradients the backward returns: hidden (B, T, d) and prefix_kv."""
    nbytes: int
    """Memory the graph keeps alive: its inputs and the activations saved for backward."""
    created: float = field(default=0.0)
    """Clock time when the graph was stored."""


class SavedBytes:
    """Counts the bytes of tensors autograd saves during a forward, excluding the model's weights."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        self._skip = {w.untyped_storage().data_ptr() for w in weights}
        self._seen: set[int] = set()
        self.nbytes = 0

    @contextmanager
    def measure(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def add(self, tensor: torch.Tensor) -> None:
        """Count a tensor the graph keeps alive besides its saved tensors (its inputs)."""
        self._pack(tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        # several saved views can share one storage; weights stay alive anyway
        if pointer not in self._skip and pointer not in self._seen:
            self._seen.add(pointer)
            self.nbytes += storage.nbytes()
        return tensor


class GraphStore:
    """Held graphs keyed by (client, step), evicted oldest first by TTL, per-client count and bytes."""

    def __init__(
        self,
        ttl_s: float,
        max_bytes: int,
        max_per_client: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_bytes, self.max_per_client = ttl_s, max_bytes, max_per_client
        self._clock = clock
        self._graphs: OrderedDict[tuple[str, str], HeldGraph] = OrderedDict()  # oldest first
        self.evicted = 0

    @property
    def nbytes(self) -> int:
        return sum(graph.nbytes for graph in self._graphs.values())

    def __len__(self) -> int:
        self._expire()
        return len(self._graphs)

    def put(self, client: str, step: str, graph: HeldGraph) -> bool:
        """Hold `graph`, evicting older ones to respect the caps; False if it alone exceeds them."""
        self._expire()
        self._graphs.pop((client, step), None)  # a repeated step replaces its graph
        if graph.nbytes > self.max_bytes:
            return False
        graph.created = self._clock()
        own = [key for key in self._graphs if key[0] == client]
        for key in own[: max(0, len(own) - self.max_per_client + 1)]:
            self._evict(key)
        while self._graphs and self.nbytes + graph.nbytes > self.max_bytes:
            self._evict(next(iter(self._graphs)))
        self._graphs[(client, step)] = graph
        return True

    def get(self, client: str, step: str) -> HeldGraph | None:
        """The graph of this client's step, or None if it was never held, expired or was evicted."""
        self._expire()
        return self._graphs.get((client, step))

    def discard(self, client: str, step: str) -> None:
        """Forget a graph (its backward ran, which frees it anyway)."""
        self._graphs.pop((client, step), None)

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        for key in [key for key, graph in self._graphs.items() if graph.created <= deadline]:
            self._evict(key)

    def _evict(self, key: tuple[str, str]) -> None:
        del self._graphs[key]
        self.evicted += 1
