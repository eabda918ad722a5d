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
from splitprefix.model.split import Bottom


def _context_cache(
    bottom: Bottom, context: torch.Tensor, positions: torch.Tensor, batch: int
) -> DynamicCache | None:
    """Keys and values of layers [0, K) for the recovered tokens `context` (t,), repeated `batch` times."""
    if not len(context):
        return None
    cache = DynamicCache(config=bottom.stack.config)
    mask = torch.ones(1, len(context), dtype=torch.long)
    bottom(context[None], mask, positions[None], cache)
    cache.batch_repeat_interleave(batch)
    return cache


def _candidate_states(
    bottom: Bottom, context: torch.Tensor, positions: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Layer-K states (V, d) of every vocabulary token at `positions[-1]`, after `context` (t,)."""
    vocab = vocab_size(bottom)
    states = []
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(start + chunk, vocab))[:, None]  # (c, 1)
        n = ids.shape[0]
        cache = _context_cache(bottom, context, positions[:-1], n)
        mask = torch.ones(n, len(context) + 1, dtype=torch.long)
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
    bottom: Bottom, observation: Observation, clip_norm: float | None, chunk: int = 4096
) -> torch.Tensor:
    """The attacker's guess (T,) of the tokens behind `observation`, position by position."""
    guesses = torch.zeros(0, dtype=torch.long)
    for t in range(len(observation.hidden)):
        candidates = _candidate_states(bottom, guesses, observation.positions[: t + 1], chunk)  # (V, d)
        if clip_norm is not None:
            candidates = clip_tokens(candidates, clip_norm)
        best = (candidates - observation.hidden[t]).pow(2).sum(-1).argmin()
        guesses = torch.cat([guesses, best.view(1)])
    return guesses
