"""The data party as a Flower ClientApp: each round it refines the joint prefix through the split.

Settings come from Flower's run config, overridden by the node's own config (kebab-case keys, see
`PartyConfig.from_flower`), except the security-relevant ones (`PARTY_ONLY_KEYS`: where the party
connects, its token, its head, its privacy option, its data and its emulator), which come only from
the node config: the run config belongs to whoever starts the run, and a run config that sets one
of them is refused. A party that raises mid-round replies with an error; the server's FedAvg logs
it and aggregates the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from splitprefix.data.batching import Batch, encode_examples, resolve_pad_id
from splitprefix.data.formats import load_jsonl
from splitprefix.data_party.accounting import privacy_report, training_releases
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import (
    LossFn,
    TrainConfig,
    load_moments,
    make_optimizer,
    optimizer_moments,
    train_prefix,
)
from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.federation.config import FlowerConfig, PartyConfig
from splitprefix.federation.quiet import quiet_flower
from splitprefix.model.prefix import Prefix

logger = logging.getLogger(__name__)
quiet_flower()  # Ray's actors import this module to run a party: the filter must live there too

KV_KEY = "kv"
"""Name of the prefix kv (L, 2, n_kv, P, head_dim) in the ArrayRecord, both ways."""
NUM_EXAMPLES = "num-examples"
"""MetricRecord key of the FedAvg weight."""
TRAIN_LOSS = "train-loss"
"""MetricRecord key of the round's mean token loss."""
SERVER_ROUND = "server-round"
"""ConfigRecord key of the round number the server sends with the joint prefix."""

MOMENTS = "optimizer-moments"
"""ArrayRecord in the party's Context state where it keeps its optimiser's moments between rounds
(with keep_optimizer_state); they never leave the party."""

SECAGG_STATE = "secaggplus_state"
"""ConfigRecord in the party's Context where Flower's `secaggplus_mod` keeps its state."""


class PartyRound(NamedTuple):
    """What a party sends back after one round."""

    kv: torch.Tensor
    """The refined prefix, (L, 2, n_kv, P, head_dim)."""
    num_examples: int
    """Examples the loss saw this round, counted once per step they were drawn in."""
    train_loss: float
    """Mean of the round's per-step token losses."""
    moments: Mapping[str, torch.Tensor] = MappingProxyType({})
    """The optimiser's state after the round, with keep_optimizer_state (else empty): kept here."""


def train_round(
    config: PartyConfig,
    kv: torch.Tensor,
    server_round: int,
    moments: Mapping[str, torch.Tensor] | None = None,
) -> PartyRound:
    """Refine the joint prefix `kv` (L, 2, n_kv, P, head_dim) through the split on this party's data.

    `moments` (an earlier round's `PartyRound.moments`) start the optimiser where that round left it.

    `num_examples` is the number of examples drawn into this round's batches: steps x batch_size,
    less the short last batch of an epoch. With local_epochs it is about epochs x the data size, so
    FedAvg weights parties by how much data they have; with local_steps it weights them equally
    unless a party's data set is smaller than one round's batches.
    """
    if kv.ndim != 5 or kv.shape[1] != 2:
        raise ShapeMismatchError(f"the joint prefix must be (L, 2, n_kv, P, head_dim); got {tuple(kv.shape)}")
    examples = load_jsonl(Path(config.data_file))
    session = open_split(config.emulator_dir, config.client_settings(), config.privacy(), config.runtime())
    try:
        prefix = Prefix(session.prefix_config(kv.shape[3]), kv)  # raises on a wrong layout
        train = config.train_config(server_round, len(examples))
        encoded = encode_examples(session.tokenizer, examples, config.max_length)
        seen = [0]
        loss_fn = _counting(session.loss_fn(), seen)
        optimizer = make_optimizer(prefix, train)
        if moments:
            load_moments(optimizer, moments)
        history = train_prefix(
            prefix,
            loss_fn,
            encoded,
            resolve_pad_id(session.tokenizer),
            train,
            desc=f"round {server_round}",
            optimizer=optimizer,
        )
    finally:
        session.close()
    _log_privacy(config, [len(e) for e in encoded], train, server_round)
    kept = optimizer_moments(optimizer) if config.keep_optimizer_state else {}
    return PartyRound(prefix().detach(), seen[0], sum(history.losses) / len(history.losses), kept)


def stored_moments(config: PartyConfig, context: Context) -> dict[str, torch.Tensor] | None:
    """The moments this party kept in its Context after its last round; None when it keeps none."""
    record = context.state.array_records.get(MOMENTS) if config.keep_optimizer_state else None
    return None if record is None else {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def store_moments(config: PartyConfig, context: Context, result: PartyRound) -> None:
    if config.keep_optimizer_state:
        context.state.array_records[MOMENTS] = ArrayRecord(dict(result.moments))


def _log_privacy(config: PartyConfig, lengths: list[int], train: TrainConfig, server_round: int) -> None:
    """Log the (epsilon, delta) of this party's sent states over rounds 1..server_round alike."""
    per_round = training_releases(lengths, train.batch_size, train.steps)
    spent = privacy_report(config.privacy(), {"train": max(server_round, 1) * per_round})
    if spent is not None:
        logger.info("after round %d: epsilon %s at delta %g", server_round, spent["epsilon"], spent["delta"])


def _counting(loss_fn: LossFn, seen: list[int]) -> LossFn:
    def counted(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        seen[0] += batch.input_ids.shape[0]  # input_ids (B, T)
        return loss_fn(batch, kv)

    return counted


def round_number(config: Mapping[str, Any]) -> int:
    """The round number the server sent with a round's config (0 when absent)."""
    server_round = config.get(SERVER_ROUND, 0)
    if not isinstance(server_round, int):
        raise ConfigError(f"{SERVER_ROUND} must be an int; got {server_round!r}")
    return server_round


def _log_round(server_round: int, result: PartyRound) -> None:
    logger.info("round %d: %d examples, loss %.4f", server_round, result.num_examples, result.train_loss)


def make_client_app(defaults: FlowerConfig | None = None) -> ClientApp:
    """A ClientApp whose settings are `defaults`, overridden by the run config (which may not set
    `PARTY_ONLY_KEYS`), then the node config."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = PartyConfig.from_flower(context.run_config, context.node_config, defaults)
        arrays = msg.content.array_records
        if len(arrays) != 1 or KV_KEY not in next(iter(arrays.values())):
            raise ConfigError(f"the train message must carry one ArrayRecord with '{KV_KEY}'")
        kv = next(iter(arrays.values()))[KV_KEY].numpy()
        server_round = round_number(msg.content.config_records.get("config") or {})
        result = train_round(
            config, torch.from_numpy(kv.copy()), server_round, stored_moments(config, context)
        )
        store_moments(config, context, result)
        _log_round(server_round, result)
        reply = RecordDict(
            {
                "arrays": ArrayRecord({KV_KEY: result.kv}),
                "metrics": MetricRecord({NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.train_loss}),
            }
        )
        return Message(reply, reply_to=msg)

    return app


def secagg_max_weight(context: Context) -> float | None:
    """The `max_weight` the SecAgg+ setup stage gave this party's `secaggplus_mod`; None outside it."""
    state = context.state.config_records.get(SECAGG_STATE)
    value = state.get("max_weight") if state is not None else None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def check_weight(num_examples: int, max_weight: float | None) -> None:
    """Raise `ConfigError` when a weight exceeds SecAgg+'s `max_weight`.

    `secaggplus_mod` only warns and goes on: the weighted prefix then overflows the quantisation
    range, and the joint prefix of every party is silently wrong.
    """
    if max_weight is not None and num_examples > max_weight:
        raise ConfigError(
            f"this party trained on {num_examples} examples this round, more than SecAgg+'s "
            f"max-weight {max_weight:g}: masking it would corrupt the joint prefix. Raise "
            "secagg-max-weight to at least local-steps x batch-size, or train on fewer examples"
        )


class _SecureParty(NumPyClient):
    """The same data party as a legacy client, which is what `secaggplus_mod` can wrap."""

    def __init__(self, config: PartyConfig, context: Context) -> None:
        self.config, self.context = config, context

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, bool | bytes | float | int | str]
    ) -> tuple[list[np.ndarray], int, dict[str, bool | bytes | float | int | str]]:
        if len(parameters) != 1:
            raise ConfigError(f"expected one array (the joint prefix); got {len(parameters)}")
        server_round = round_number(config)
        kv = torch.from_numpy(parameters[0].copy())
        result = train_round(self.config, kv, server_round, stored_moments(self.config, self.context))
        store_moments(self.config, self.context, result)
        _log_round(server_round, result)
        check_weight(result.num_examples, secagg_max_weight(self.context))  # before the mod masks it
        return [result.kv.numpy()], result.num_examples, {TRAIN_LOSS: result.train_loss}


def make_secure_client_app(defaults: FlowerConfig | None = None) -> ClientApp:
    """`make_client_app`'s party behind Flower's SecAgg+ mod: its prefix leaves only masked.

    Pair it with a ServerApp whose config sets `secure`.
    """

    def client_fn(context: Context) -> Client:
        config = PartyConfig.from_flower(context.run_config, context.node_config, defaults)
        return _SecureParty(config, context).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


app = make_client_app()
"""The ClientApp Flower loads (`splitprefix.federation.client_app:app`)."""

secure_app = make_secure_client_app()
"""The ClientApp for SecAgg+ runs (`splitprefix.federation.client_app:secure_app`)."""
