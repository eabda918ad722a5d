"""Dirichlet label-skew partition: exact cover, minimum sizes, and skew that follows alpha."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import pytest

from splitprefix.data.partition import dirichlet_partition
from splitprefix.errors import ConfigError

LABELS = [f"intent{i % 10}" for i in range(1000)]


def _distribution(labels: list[str], part: list[int]) -> dict[str, float]:
    counts = Counter(labels[i] for i in part)
    return {label: counts[label] / len(part) for label in set(labels)}


def _tv(p: dict[str, float], q: dict[str, float]) -> float:
    """Total variation distance between two label distributions."""
    return 0.5 * sum(abs(p[k] - q[k]) for k in p)


def _mean_pairwise_tv(labels: list[str], parts: list[list[int]]) -> float:
    dists = [_distribution(labels, part) for part in parts]
    pairs = list(combinations(dists, 2))
    return sum(_tv(p, q) for p, q in pairs) / len(pairs)


@pytest.mark.parametrize("alpha", [0.05, 1.0, 1e4])
def test_every_index_goes_to_exactly_one_party(alpha: float) -> None:
    parts = dirichlet_partition(LABELS, n_parties=4, alpha=alpha, seed=0)

    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(LABELS)))
    assert len(flat) == len(set(flat))
    assert all(part == sorted(part) and len(part) >= 1 for part in parts)


def test_same_seed_gives_the_same_partition() -> None:
    first = dirichlet_partition(LABELS, 3, 0.5, seed=11)

    assert first == dirichlet_partition(LABELS, 3, 0.5, seed=11)
    assert first != dirichlet_partition(LABELS, 3, 0.5, seed=12)


def test_small_alpha_gives_parties_different_intents() -> None:
    parts = dirichlet_partition(LABELS, n_parties=3, alpha=0.05, seed=0)

    assert _mean_pairwise_tv(LABELS, parts) > 0.5
    # Each party sees only some of the intents in any real number.
    assert all(sum(1 for share in _distribution(LABELS, p).values() if share > 0.02) < 10 for p in parts)


def test_huge_alpha_is_close_to_iid() -> None:
    parts = dirichlet_partition(LABELS, n_parties=3, alpha=1e5, seed=0)
    overall = _distribution(LABELS, list(range(len(LABELS))))

    assert max(_tv(_distribution(LABELS, part), overall) for part in parts) < 0.03
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 10


def test_skew_shrinks_as_alpha_grows() -> None:
    skews = [_mean_pairwise_tv(LABELS, dirichlet_partition(LABELS, 3, a, seed=1)) for a in (0.05, 1.0, 100.0)]

    assert skews[0] > skews[1] > skews[2]


def test_min_size_holds_even_when_draws_are_extreme() -> None:
    labels = [i % 2 for i in range(30)]

    parts = dirichlet_partition(labels, n_parties=10, alpha=0.001, seed=0, min_size=3)

    assert [len(part) for part in parts] == [3] * 10
    assert sorted(i for part in parts for i in part) == list(range(30))


def test_one_party_gets_everything() -> None:
    assert dirichlet_partition(["a", "b", "a"], n_parties=1, alpha=0.1, seed=0) == [[0, 1, 2]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_parties": 0}, "n_parties is 0"),
        ({"alpha": 0.0}, "alpha is 0.0"),
        ({"alpha": float("nan")}, "alpha is nan"),
        ({"min_size": -1}, "min_size is -1"),
        ({"n_parties": 5, "min_size": 3}, "10 items cannot give 5 parties 3 each"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, float], message: str) -> None:
    args: dict[str, float] = {"n_parties": 2, "alpha": 1.0, "seed": 0, "min_size": 1, **kwargs}

    with pytest.raises(ConfigError, match=message):
        dirichlet_partition(list("ab" * 5), **args)  # type: ignore[arg-type]
