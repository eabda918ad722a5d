"""FedAvg of prefixes against hand-computed weighted averages, and against Flower's own aggregation."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.federation import weighted_average


def test_unequal_counts_give_the_hand_computed_average():
    # Prepare: (1*1 + 3*5) / 4 = 4 and (1*2 + 3*(-2)) / 4 = -1
    a = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1, 1)
    b = torch.tensor([5.0, -2.0]).view(1, 2, 1, 1, 1)

    # Execute
    joint = weighted_average([a, b], [1, 3])

    # Assert
    torch.testing.assert_close(joint, torch.tensor([4.0, -1.0]).view(1, 2, 1, 1, 1), atol=0, rtol=0)


def test_three_parties_with_unequal_counts():
    kvs = [torch.full((2, 2, 1, 3, 4), v) for v in (0.0, 10.0, 100.0)]

    joint = weighted_average(kvs, [2, 3, 5])  # (0*2 + 10*3 + 100*5) / 10 = 53

    torch.testing.assert_close(joint, torch.full((2, 2, 1, 3, 4), 53.0))
    assert joint.dtype == torch.float32


def test_one_party_gets_its_own_prefix_back():
    kv = torch.randn(2, 2, 1, 3, 4)

    torch.testing.assert_close(weighted_average([kv], [7]), kv)


def test_flowers_fedavg_weights_by_num_examples_like_weighted_average():
    # Prepare: the replies Flower's FedAvg aggregates on the server
    torch.manual_seed(0)
    kvs, counts = [torch.randn(2, 2, 1, 3, 4) for _ in range(3)], [4, 8, 12]
    replies = [
        RecordDict({"arrays": ArrayRecord({"kv": kv}), "metrics": MetricRecord({"num-examples": n})})
        for kv, n in zip(kvs, counts, strict=True)
    ]

    # Execute
    flower = torch.from_numpy(aggregate_arrayrecords(replies, "num-examples")["kv"].numpy())

    # Assert
    torch.testing.assert_close(flower, weighted_average(kvs, counts), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("kvs", "counts", "error", "match"),
    [
        ([], [], ConfigError, "at least one prefix"),
        ([torch.zeros(1, 2, 1, 1, 1)], [1, 2], ConfigError, "1 prefixes but 2"),
        ([torch.zeros(1, 2, 1, 1, 1)] * 2, [1, 0], ConfigError, r"int >= 1; got \[1, 0\]"),
        ([torch.zeros(1, 2, 1, 1, 1)] * 2, [1, -3], ConfigError, "int >= 1"),
        (
            [torch.zeros(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 2, 1)],
            [1, 1],
            ShapeMismatchError,
            r"\(1, 2, 1, 2, 1\)",
        ),
    ],
    ids=["empty", "length-mismatch", "zero-count", "negative-count", "shape-mismatch"],
)
def test_bad_inputs_raise_clear_errors(kvs, counts, error, match):
    with pytest.raises(error, match=match):
        weighted_average(kvs, counts)
