"""The SecAgg+ strategy's handlers, called directly (the whole protocol runs in test_simulation)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from splitprefix.federation.config import FederationConfig
from splitprefix.federation.secure import SecureFedAvg


class Keeper:
    """Records what the strategy hands to the server's per-round saving and evaluation."""

    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.last_round = dict

    def __call__(self, server_round, arrays):
        self.rounds.append(server_round)
        return None


def test_the_unmasked_joint_prefix_goes_on_in_float32():
    # Prepare: SecAgg+ hands aggregate_fit every party's result carrying the same float64 mean
    strategy = SecureFedAvg(
        FederationConfig("emu", "http://x", "o", secure=True), torch.zeros(1, 2, 1, 1, 1), Keeper()
    )
    mean = ndarrays_to_parameters([np.full((1, 2, 1, 1, 1), 4.0, dtype=np.float64)])
    results = [(None, FitRes(Status(Code.OK, ""), mean, n, {})) for n in (1, 3)]

    # Execute
    parameters, _ = strategy.aggregate_fit(1, results, [])

    # Assert: the mean unchanged, in the prefix's dtype, and the round's record
    (joint,) = parameters_to_ndarrays(parameters)
    assert joint.dtype == np.float32
    np.testing.assert_array_equal(joint, np.full((1, 2, 1, 1, 1), 4.0, dtype=np.float32))
    assert strategy.last_round == {"parties": 2, "failed": 0, "errors": []}


def test_each_round_is_handed_to_the_keeper_with_its_number():
    keeper = Keeper()
    strategy = SecureFedAvg(
        FederationConfig("emu", "http://x", "o", secure=True), torch.zeros(1, 2, 1, 1, 1), keeper
    )

    strategy.evaluate(2, ndarrays_to_parameters([np.zeros((1, 2, 1, 1, 1), dtype=np.float32)]))

    assert keeper.rounds == [2]
