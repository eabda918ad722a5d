"""Nearest-neighbour inversion: the attacker reruns the bottom layers it owns on every token.

Left to right, for each position it runs every vocabulary token, in one batch, through the
embeddings and layers [0, K) with the tokens recovered so far as context (a key/value cache), and
picks the token whose layer-K state lies nearest the observed one. The attacker does not know the
data party's prefix for those layers, so it runs them without one, at the observed positions. It
knows the clipping norm, so it clips its candidates the same way; with Gaussian noise on the
observation, the nearest clipped candidate is the most likely token.

The context's keys and values are recomputed for each chunk of candidates: t tokens against the
chunk's thousands.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from splitprefix.audit.observe import Observation
from splitprefix.data_party.privacy import clip_tokens
from splitprefix.model.prefix import prefix_cache
from splitprefix.model.split import Bottom


def _context_cache(
    bottom: Bottom, context: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor | None, batch: int
) -> DynamicCache | None:
    """Keys and values of layers [0, K) for the prefix `kv` (K, 2, n_kv, P, hd) and the recovered
    tokens `context` (t,), repeated `batch` times."""
    p = 0 if kv is None else kv.shape[3]
    if not len(context) and not p:
        return None
    config = bottom.stack.config
    cache = prefix_cache(kv, config, 1) if kv is not None and p else DynamicCache(config=config)
    if len(context):
        mask = torch.ones(1, p + len(context), dtype=torch.long, device=context.device)
        bottom(context[None], mask, positions[None], cache)
    cache.batch_repeat_interleave(batch)
    return cache


def _candidate_states(
    bottom: Bottom, context: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    """Layer-K states (V, d) of every vocabulary token at `positions[-1]`, after `context` (t,)."""
    vocab, device = vocab_size(bottom), context.device
    keys = len(context) + 1 + (0 if kv is None else kv.shape[3])
    states = []
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(start + chunk, vocab), device=device)[:, None]  # (c, 1)
        n = ids.shape[0]
        cache = _context_cache(bottom, context, positions[:-1], kv, n)
        mask = torch.ones(n, keys, dtype=torch.long, device=device)
        x = bottom(ids, mask, positions[-1:].expand(n, 1), cache)
        states.append(x.hidden[:, 0].float())  # (c, d)
    return torch.cat(states)


def vocab_size(bottom: Bottom) -> int:
    """Rows of the bottom's token embedding matrix."""
    return int(embedding_matrix(bottom).shape[0])


def embedding_matrix(bottom: Bottom) -> torch.Tensor:
    """The token embedding matrix (V, d) the attacker owns."""
    weight = bottom.embeddings.tokens.weight
    assert isinstance(weight, torch.Tensor)
    return weight


@torch.no_grad()
def nearest_neighbour_attack(
    bottom: Bottom,
    observation: Observation,
    clip_norm: float | None,
    bottom_kv: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """The attacker's guess (T,) of the tokens behind `observation`, position by position.

    `bottom_kv` (K, 2, n_kv, P, hd) is the data party's prefix for layers [0, K), for an attacker
    that has learnt it (e.g. as the aggregator of a federation); None runs the layers without one.
    The guess lies on the bottom's device.
    """
    weight = embedding_matrix(bottom)
    guesses = torch.zeros(0, dtype=torch.long, device=weight.device)
    positions, observed = observation.positions.to(weight.device), observation.hidden.to(weight.device)
    if bottom_kv is not None:
        bottom_kv = bottom_kv.to(weight.device, weight.dtype)
    for t in range(len(observed)):
        candidates = _candidate_states(bottom, guesses, positions[: t + 1], bottom_kv, chunk)  # (V, d)
        if clip_norm is not None:
            candidates = clip_tokens(candidates, clip_norm)
        best = (candidates - observed[t].float()).pow(2).sum(-1).argmin()
        guesses = torch.cat([guesses, best.view(1)])
    return guesses
