"""The server strategies' math, called directly: FedAvg by example count, Flower's server optimisers
on top of it, and their SecAgg+ twins on Flower's legacy API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from splitprefix.errors import ConfigError
from splitprefix.federation.client_app import KV_KEY, NUM_EXAMPLES
from splitprefix.federation.config import STRATEGY_NAMES, FederationConfig
from splitprefix.federation.secure import make_secure_strategy
from splitprefix.federation.strategies import make_strategy, server_settings

SHAPE = (1, 2, 1, 2, 1)


@pytest.fixture(autouse=True)
def as_superlink(monkeypatch):
    """The process identity Flower sets before it builds messages, as its SuperLink would."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class TwoNodes(Grid):
    """Just enough of a Grid for `configure_train` to sample two nodes."""

    def set_run(self, run):  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):  # pragma: no cover - unused
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - unused
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - unused
        raise NotImplementedError


class Keeper:
    """Stands in for the server's per-round saving and evaluation."""

    last_round = dict

    def __call__(self, server_round, arrays):
        return None


def config(strategy: str, **fields: object) -> FederationConfig:
    return FederationConfig("emu", "http://x", "o", min_parties=2, strategy=strategy, **fields)  # type: ignore[arg-type]


def plain_round(strategy, server_round: int, joint: np.ndarray, parties: list[tuple[np.ndarray, int]]):
    """One round of the ServerApp's strategy: configure from `joint`, aggregate the parties' replies."""
    asked = list(
        strategy.configure_train(
            server_round, ArrayRecord({KV_KEY: torch.from_numpy(joint)}), ConfigRecord(), TwoNodes()
        )
    )
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({KV_KEY: torch.from_numpy(kv)}),
                    "metrics": MetricRecord({NUM_EXAMPLES: n}),
                }
            ),
            reply_to=message,
        )
        for message, (kv, n) in zip(asked, parties, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays[KV_KEY].numpy()


def secure_round(strategy, server_round: int, parties: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """What SecAgg+ hands the legacy strategy: every result carries the unmasked weighted mean."""
    total = sum(n for _, n in parties)
    mean = sum(kv.astype(np.float64) * n for kv, n in parties) / total
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([mean]), n, {})) for _, n in parties]
    parameters, _ = strategy.aggregate_fit(server_round, results, [])
    return parameters_to_ndarrays(parameters)[0]


def two_rounds() -> list[list[tuple[np.ndarray, int]]]:
    rng = np.random.default_rng(0)
    return [[(rng.normal(size=SHAPE).astype(np.float32), n) for n in (1, 3)] for _ in range(2)]


def test_fedavg_is_the_example_weighted_mean():
    strategy = make_strategy(config("fedavg"))
    parties = [(np.full(SHAPE, 1.0, np.float32), 1), (np.full(SHAPE, 5.0, np.float32), 3)]

    joint = plain_round(strategy, 1, np.zeros(SHAPE, np.float32), parties)

    np.testing.assert_allclose(joint, np.full(SHAPE, 4.0))  # (1*1 + 3*5) / 4


def test_fedavgm_scales_the_step_to_the_mean_by_the_server_lr():
    strategy = make_strategy(config("fedavgm", server_lr=2.0))
    start = np.full(SHAPE, 1.0, np.float32)
    parties = [(np.full(SHAPE, 2.0, np.float32), 1), (np.full(SHAPE, 2.0, np.float32), 1)]

    joint = plain_round(strategy, 1, start, parties)

    np.testing.assert_allclose(joint, np.full(SHAPE, 3.0))  # 1 + 2 * (2 - 1)


def test_fedadam_takes_a_bias_corrected_adam_step_on_the_mean():
    # Prepare: the mean's step is +0.5 everywhere; Flower's FedAdam: beta_1 0.9, beta_2 0.99
    strategy = make_strategy(config("fedadam", server_lr=0.3, server_tau=1e-3))
    start = np.zeros(SHAPE, np.float32)
    parties = [(np.full(SHAPE, 0.25, np.float32), 1), (np.full(SHAPE, 0.75, np.float32), 1)]

    joint = plain_round(strategy, 1, start, parties)

    m, v = 0.1 * 0.5, 0.01 * 0.25
    eta = 0.3 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower corrects with server_round + 1
    np.testing.assert_allclose(joint, np.full(SHAPE, eta * m / (math.sqrt(v) + 1e-3)), rtol=1e-5)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_the_secure_twin_of_each_strategy_computes_the_same_joint_prefix(name):
    # Prepare: the same settings for the ServerApp's strategy and its legacy twin under SecAgg+
    settings = config(name, server_lr=0.5, server_momentum=0.5 if name == "fedavgm" else 0.0)
    start = np.zeros(SHAPE, np.float32)
    plain = make_strategy(settings)
    secure = make_secure_strategy(settings, torch.from_numpy(start), Keeper())

    # Execute: two rounds, so that the server optimisers' moments carry over
    joint_plain, joint_secure = start, start
    for server_round, parties in enumerate(two_rounds(), start=1):
        joint_plain = plain_round(plain, server_round, joint_plain, parties)
        joint_secure = secure_round(secure, server_round, parties)

    # Assert: equal to float32 rounding, and in float32 as the parties train
    assert joint_secure.dtype == np.float32
    np.testing.assert_allclose(joint_secure, joint_plain, rtol=1e-5, atol=1e-6)


def test_fedavg_takes_no_server_optimiser_settings():
    assert server_settings(config("fedavg", server_lr=3.0)) == {}
    assert server_settings(config("fedyogi", server_lr=3.0)) == {"eta": 3.0, "tau": 1e-3}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"strategy": "fedprox"}, "strategy must be one of"),
        ({"server_lr": 0.0}, "server_lr"),
        ({"server_momentum": 1.0}, "server_momentum"),
        ({"server_tau": -1.0}, "server_tau"),
    ],
)
def test_bad_strategy_settings_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        FederationConfig("emu", "http://x", "o", **fields)  # type: ignore[arg-type]
