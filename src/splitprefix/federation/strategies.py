"""The server's aggregation strategies: Flower's FedAvg by example count, and Flower's server
optimisers over the parties' example-weighted update.

Every strategy first takes FedAvg's example-weighted mean of the parties' prefixes. FedAvg stops
there (the reference: claim 9's weighting); FedAvgM, FedAdam, FedYogi and FedAdagrad treat the step
from the round's joint prefix to that mean as a pseudo-gradient and apply their server optimiser to
it (Reddi et al., "Adaptive Federated Optimization"). Their moments live in the server's memory:
a resumed run starts them again at zero.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from splitprefix.federation.client_app import NUM_EXAMPLES
from splitprefix.federation.config import FederationConfig, StrategyName

logger = logging.getLogger(__name__)


class PrefixRounds(FedAvg):
    """The rounds' bookkeeping every strategy shares: run-wide round numbers for the parties, the
    bound on each party's num-examples, and a record of each round's replies and failures.

    Put it first among the bases (`class X(PrefixRounds, FedAdam)`) so that its
    `configure_train` and `aggregate_train` wrap the Flower strategy's.
    """

    def __init__(
        self, min_parties: int, min_replies: int, examples_bound: int, rounds_before: int = 0, **server: Any
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            min_train_nodes=min_parties,
            min_available_nodes=min_parties,
            weighted_by_key=NUM_EXAMPLES,
            **server,
        )
        self.min_replies = min_replies
        self.examples_bound = examples_bound
        self.rounds_before = rounds_before
        self.last_round: dict[str, Any] = {}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # the operator evaluates; parties only train (said here rather than by fraction_evaluate=0,
        # which Flower answers with a warning at every start)
        return []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # the parties get the run's round number, counting a resumed run's earlier rounds, so that
        # their data order (seed + round) and lr schedule go on as in an uninterrupted run
        return super().configure_train(self.rounds_before + server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies, round_number = list(replies), self.rounds_before + server_round
        errors = [f"party {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
        refusals = {id(m): self.refusal(m) for m in replies if not m.has_error()}
        ok = [m for m in replies if not m.has_error() and refusals[id(m)] is None]
        refused = [reason for reason in refusals.values() if reason is not None]
        for error in errors + refused:
            logger.warning("round %d: %s", round_number, error)
        self.last_round = {
            "parties": len(ok),
            "failed": len(errors),
            "refused": len(refused),
            "errors": errors + refused,
        }
        replies = [m for m in replies if m.has_error() or refusals[id(m)] is None]
        if len(ok) < self.min_replies:
            logger.warning(
                "round %d: %d replies, fewer than min_replies=%d; the joint prefix stays as it was",
                round_number,
                len(ok),
                self.min_replies,
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.last_round |= {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        return arrays, metrics

    def refusal(self, reply: Message) -> str | None:
        """Why a party's reply is refused: a num-examples that is no int in [1, examples_bound]."""
        counts = [r.get(NUM_EXAMPLES) for r in reply.content.metric_records.values() if NUM_EXAMPLES in r]
        count = counts[0] if len(counts) == 1 else None
        if isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= self.examples_bound:
            return None
        return (
            f"party {reply.metadata.src_node_id}: reported {NUM_EXAMPLES} {count!r}, expected an int "
            f"in [1, {self.examples_bound}] (max-examples); its prefix was refused"
        )


class PrefixFedAvg(PrefixRounds):
    """Flower's FedAvg weighted by num-examples: the joint prefix is the parties' weighted mean."""


class PrefixFedAvgM(PrefixRounds, FedAvgM):
    """FedAvgM: server SGD with momentum on the weighted mean's step."""


class PrefixFedAdam(PrefixRounds, FedAdam):
    """FedAdam: server Adam on the weighted mean's step."""


class PrefixFedYogi(PrefixRounds, FedYogi):
    """FedYogi: server Yogi on the weighted mean's step."""


class PrefixFedAdagrad(PrefixRounds, FedAdagrad):
    """FedAdagrad: server Adagrad on the weighted mean's step."""


STRATEGIES: dict[StrategyName, type[PrefixRounds]] = {
    "fedavg": PrefixFedAvg,
    "fedavgm": PrefixFedAvgM,
    "fedadam": PrefixFedAdam,
    "fedyogi": PrefixFedYogi,
    "fedadagrad": PrefixFedAdagrad,
}


def server_settings(config: FederationConfig) -> dict[str, float]:
    """The Flower keyword arguments of `config.strategy`'s server optimiser (none for FedAvg)."""
    if config.strategy == "fedavg":
        return {}
    if config.strategy == "fedavgm":
        return {"server_learning_rate": config.server_lr, "server_momentum": config.server_momentum}
    return {"eta": config.server_lr, "tau": config.server_tau}


def make_strategy(config: FederationConfig, rounds_before: int = 0) -> PrefixRounds:
    """The Flower strategy `config.strategy`, with the run's bounds and its server optimiser's settings."""
    return STRATEGIES[config.strategy](
        config.min_parties,
        config.min_replies,
        config.examples_bound,
        rounds_before,
        **server_settings(config),
    )
