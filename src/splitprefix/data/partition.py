"""Split one labelled data set among several data parties with a controlled label skew.

`dirichlet_partition` follows Hsu et al. (2019), "Measuring the effects of non-identical data
distribution": for every label separately, the shares of that label's examples that each party gets
are drawn from a symmetric Dirichlet(alpha) over the parties.

- Small alpha (0.1 or less): each label goes almost entirely to one or two parties, so each party
  sees only a few intents, and party sizes differ widely.
- alpha = 1: shares are uniform over the simplex; a moderate skew.
- Large alpha (100 or more): every party gets close to 1/n of every label, which is near IID.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence

from splitprefix.errors import ConfigError

_MAX_DRAWS = 50
"""Dirichlet draws tried before small parties are topped up deterministically."""


def dirichlet_partition(
    labels: Sequence[Hashable], n_parties: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Indices into ``labels`` for each of ``n_parties`` parties, skewed by Dirichlet(``alpha``).

    Every index is assigned to exactly one party; each party's list is sorted. Draws are repeated
    (deterministically, from ``seed``) until every party holds at least ``min_size`` items; after
    `_MAX_DRAWS` failed draws the smallest parties are topped up from the largest ones.
    """
    _check_args(len(labels), n_parties, alpha, min_size)
    rng = random.Random(seed)
    by_label = _indices_by_label(labels, rng)
    parts = _draw(by_label, n_parties, alpha, rng)
    for _ in range(_MAX_DRAWS - 1):
        if min(len(part) for part in parts) >= min_size:
            break
        parts = _draw(by_label, n_parties, alpha, rng)
    _top_up(parts, min_size)
    assert sorted(i for part in parts for i in part) == list(range(len(labels)))
    return [sorted(part) for part in parts]


def _check_args(n_items: int, n_parties: int, alpha: float, min_size: int) -> None:
    if n_parties < 1:
        raise ConfigError(f"n_parties is {n_parties}, expected at least 1")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha is {alpha}, expected a finite number > 0")
    if min_size < 0:
        raise ConfigError(f"min_size is {min_size}, expected 0 or more")
    if n_items < n_parties * min_size:
        raise ConfigError(
            f"{n_items} items cannot give {n_parties} parties {min_size} each, "
            f"expected at least {n_parties * min_size} items"
        )


def _indices_by_label(labels: Sequence[Hashable], rng: random.Random) -> list[list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    # Labels keep first-appearance order (not sorted: they need not be comparable), so the result
    # depends only on the data and the seed.
    shuffled = list(groups.values())
    for group in shuffled:
        rng.shuffle(group)
    return shuffled


def _draw(by_label: list[list[int]], n_parties: int, alpha: float, rng: random.Random) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(n_parties)]
    for group in by_label:
        shares = _dirichlet(n_parties, alpha, rng)
        cumulative = 0.0
        start = 0
        for party, share in enumerate(shares):
            cumulative += share
            # Cutting at rounded cumulative shares makes the pieces tile the group exactly.
            end = len(group) if party == n_parties - 1 else round(cumulative * len(group))
            parts[party].extend(group[start:end])
            start = max(start, end)
    return parts


def _dirichlet(n: int, alpha: float, rng: random.Random) -> list[float]:
    gammas = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
    total = sum(gammas)
    if total == 0.0:
        # Tiny alpha can underflow every draw to 0; the limit of Dirichlet(alpha -> 0) is one-hot.
        winner = rng.randrange(n)
        return [1.0 if i == winner else 0.0 for i in range(n)]
    return [g / total for g in gammas]


def _top_up(parts: list[list[int]], min_size: int) -> None:
    """Move items from the largest party to each party below ``min_size`` (deterministic)."""
    for part in parts:
        while len(part) < min_size:
            donor = max(parts, key=len)
            part.append(donor.pop())
