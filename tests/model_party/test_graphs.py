"""The graph store: TTL expiry, per-client and memory caps, isolation, and memory measurement."""

from __future__ import annotations

import torch

from splitprefix.model_party.graphs import GraphStore, HeldGraph, SavedBytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _graph(nbytes: int = 10) -> HeldGraph:
    leaf = torch.zeros(1)
    return HeldGraph(output=leaf, inputs=(leaf, leaf), nbytes=nbytes)


def _store(
    ttl_s: float = 10.0, max_bytes: int = 1000, max_per_client: int = 4
) -> tuple[GraphStore, FakeClock]:
    clock = FakeClock()
    return GraphStore(ttl_s, max_bytes, max_per_client, clock=clock), clock


def test_a_graph_expires_after_its_ttl():
    # Prepare
    store, clock = _store(ttl_s=10)
    store.put("alice", "s1", _graph())

    # Execute / Assert
    clock.now = 9.9
    assert store.get("alice", "s1") is not None
    clock.now = 10.0
    assert store.get("alice", "s1") is None
    assert store.evicted == 1 and len(store) == 0


def test_the_per_client_cap_evicts_that_clients_oldest_graph_only():
    # Prepare
    store, _ = _store(max_per_client=2)
    store.put("bob", "b1", _graph())

    # Execute
    for step in ("a1", "a2", "a3"):
        store.put("alice", step, _graph())

    # Assert
    assert store.get("alice", "a1") is None
    assert store.get("alice", "a2") is not None and store.get("alice", "a3") is not None
    assert store.get("bob", "b1") is not None


def test_the_memory_cap_evicts_the_oldest_graphs_of_any_client():
    # Prepare
    store, _ = _store(max_bytes=100)
    store.put("bob", "b1", _graph(40))
    store.put("alice", "a1", _graph(40))

    # Execute
    store.put("alice", "a2", _graph(40))

    # Assert
    assert store.get("bob", "b1") is None
    assert store.get("alice", "a1") is not None and store.get("alice", "a2") is not None
    assert store.nbytes == 80


def test_a_graph_larger_than_the_cap_is_refused_and_evicts_nothing():
    store, _ = _store(max_bytes=100)
    store.put("bob", "b1", _graph(40))
    assert store.put("alice", "big", _graph(101)) is False
    assert store.get("alice", "big") is None and store.get("bob", "b1") is not None


def test_clients_cannot_see_each_others_steps():
    store, _ = _store()
    store.put("alice", "s1", _graph())
    assert store.get("bob", "s1") is None
    store.discard("bob", "s1")
    assert store.get("alice", "s1") is not None


def test_a_repeated_step_replaces_its_graph():
    store, _ = _store()
    first, second = _graph(), _graph()
    store.put("alice", "s1", first)
    store.put("alice", "s1", second)
    assert store.get("alice", "s1") is second and len(store) == 1


def test_saved_bytes_counts_activations_once_and_skips_weights():
    # Prepare
    weight = torch.randn(256, 64)
    x = torch.randn(8, 64, requires_grad=True)
    saved = SavedBytes([weight])

    # Execute: the matmul saves only the weight (it needs no gradient of its own); `h * h` saves
    # `h` twice, in one storage
    with saved.measure():
        h = x @ weight.T  # (8, 256)
        y = (h * h).sum()

    # Assert
    assert saved.nbytes == h.numel() * 4
    (grad,) = torch.autograd.grad(y, x)  # the hooks leave the graph usable
    assert grad.shape == x.shape
