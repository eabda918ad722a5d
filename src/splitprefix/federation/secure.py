"""Secure aggregation with Flower's SecAgg+: the server learns the example-weighted sum of the
parties' prefixes, never one party's prefix.

SecAgg+ runs only on Flower's legacy API: `SecAggPlusWorkflow` inside `DefaultWorkflow`, with a
legacy strategy (FedAvg, or the legacy twin of the chosen server optimiser), and parties that are legacy clients behind `secaggplus_mod`
(`client_app.secure_app`). Each party uploads `[n, n * kv]`, quantised and masked with pairwise
and private masks; the masks cancel only in the sum over parties, which the server divides by the
summed `n`. So the num-examples weighting of claim 9 holds, up to the quantisation step
`2 * clipping_range / 2**22`, amplified by `max_weight / sum(n)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdagrad as LegacyFedAdagrad
from flwr.server.strategy import FedAdam as LegacyFedAdam
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import FedAvgM as LegacyFedAvgM
from flwr.server.strategy import FedYogi as LegacyFedYogi
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from splitprefix.federation.client_app import KV_KEY, SERVER_ROUND
from splitprefix.federation.strategies import server_settings

if TYPE_CHECKING:
    from splitprefix.federation.config import FederationConfig, StrategyName

logger = logging.getLogger(__name__)

FitResults = list[tuple[ClientProxy, FitRes]]
FitFailures = list[tuple[ClientProxy, FitRes] | BaseException]


class RoundKeeper(Protocol):
    """Saves, evaluates and logs the joint prefix after each round (server_app._RoundKeeper)."""

    last_round: Callable[[], dict[str, Any]]
    """Reads the strategy's record of the round just aggregated."""

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None: ...


class SecureRounds(LegacyFedAvg):
    """A legacy strategy that records each round's parties and failures; SecAgg+ gives it only the
    sum. Put it first among the bases, before the legacy strategy whose server optimiser it runs."""

    def __init__(
        self,
        config: FederationConfig,
        kv: torch.Tensor,
        keeper: RoundKeeper,
        rounds_before: int = 0,
        **server: Any,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=config.min_parties,
            min_available_clients=config.min_parties,
            initial_parameters=ndarrays_to_parameters([kv.numpy()]),
            evaluate_fn=self._evaluate,
            on_fit_config_fn=lambda server_round: {SERVER_ROUND: rounds_before + server_round},
            accept_failures=True,
            # the round's record is the keeper's; without a function Flower warns in every run
            fit_metrics_aggregation_fn=lambda metrics: {},
            **server,
        )
        self.keeper = keeper
        self.dtype = kv.numpy().dtype
        self.last_round: dict[str, Any] = {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        # what the round's record says if SecAgg+ halts before it reaches aggregate_fit
        halted = "SecAgg+ halted (too few parties completed it); the joint prefix stays as it was"
        self.last_round = {"parties": 0, "failed": 0, "errors": [halted]}
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        errors = [f"party failed: {f!r}" for f in failures]
        for error in errors:
            logger.warning("round %d: %s", server_round, error)
        self.last_round = {"parties": len(results), "failed": len(failures), "errors": errors}
        # every result carries the unmasked mean already (SecAgg+ replaced each party's), so the
        # legacy FedAvg below returns it and a server optimiser steps from it
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        # SecAgg+ dequantises to float64; the prefix travels and trains in float32
        return ndarrays_to_parameters(
            [a.astype(self.dtype) for a in parameters_to_ndarrays(parameters)]
        ), metrics

    def _evaluate(
        self, server_round: int, ndarrays: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        metrics = self.keeper(server_round, ArrayRecord({KV_KEY: torch.from_numpy(ndarrays[0].copy())}))
        if metrics is None:
            return None
        values = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        return float(values.get("eval-loss", 0.0)), values  # type: ignore[return-value]


class SecureFedAvg(SecureRounds):
    """Legacy FedAvg under SecAgg+: the joint prefix is the unmasked example-weighted mean."""


class SecureFedAvgM(SecureRounds, LegacyFedAvgM):
    """Legacy FedAvgM on the unmasked mean."""


class SecureFedAdam(SecureRounds, LegacyFedAdam):
    """Legacy FedAdam on the unmasked mean."""


class SecureFedYogi(SecureRounds, LegacyFedYogi):
    """Legacy FedYogi on the unmasked mean."""


class SecureFedAdagrad(SecureRounds, LegacyFedAdagrad):
    """Legacy FedAdagrad on the unmasked mean."""


SECURE_STRATEGIES: dict[StrategyName, type[SecureRounds]] = {
    "fedavg": SecureFedAvg,
    "fedavgm": SecureFedAvgM,
    "fedadam": SecureFedAdam,
    "fedyogi": SecureFedYogi,
    "fedadagrad": SecureFedAdagrad,
}
"""The legacy twin of each of `strategies.STRATEGIES`: SecAgg+ runs only on Flower's legacy API."""


def make_secure_strategy(
    config: FederationConfig, kv: torch.Tensor, keeper: RoundKeeper, rounds_before: int = 0
) -> SecureRounds:
    """The legacy twin of `strategies.make_strategy(config)`, starting from the joint prefix `kv`."""
    return SECURE_STRATEGIES[config.strategy](config, kv, keeper, rounds_before, **server_settings(config))


def run_secure_rounds(
    grid: Grid,
    config: FederationConfig,
    kv: torch.Tensor,
    num_rounds: int,
    keeper: RoundKeeper,
    rounds_before: int = 0,
) -> None:
    """Run `num_rounds` SecAgg+ rounds from the joint prefix `kv` (L, 2, n_kv, P, head_dim).

    `keeper` is called with each round's joint prefix, and its `last_round` is pointed at the
    strategy's record of the round. The parties are told round numbers after `rounds_before`.
    """
    strategy = make_secure_strategy(config, kv, keeper, rounds_before)
    keeper.last_round = lambda: strategy.last_round
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every party holds a share of every other party's keys
            reconstruction_threshold=config.secagg_threshold,
            max_weight=config.secagg_max_weight,
            clipping_range=config.secagg_clipping_range,
            timeout=config.round_timeout_s,
        )
    )
    run = grid.run
    context = Context(run.run_id, 0, {}, RecordDict(), dict(run.override_config))
    workflow(grid, LegacyContext(context, ServerConfig(num_rounds, config.round_timeout_s), strategy))
