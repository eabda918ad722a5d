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
from dataclasses import dataclass, fields
from pathlib import Path
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
from splitprefix.data_party.offsite import steps_for
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import LossFn, TrainConfig, train_prefix
from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.model.prefix import Prefix
from splitprefix.runtime import DtypeName, RuntimeSettings
from splitprefix.wire.schemas import HeadMode

logger = logging.getLogger(__name__)

KV_KEY = "kv"
"""Name of the prefix kv (L, 2, n_kv, P, head_dim) in the ArrayRecord, both ways."""
NUM_EXAMPLES = "num-examples"
"""MetricRecord key of the FedAvg weight."""
TRAIN_LOSS = "train-loss"
"""MetricRecord key of the round's mean token loss."""
SERVER_ROUND = "server-round"
"""ConfigRecord key of the round number the server sends with the joint prefix."""

FlowerConfig = Mapping[str, bool | float | int | str]

PARTY_ONLY_KEYS = frozenset(
    {
        "emulator-dir",
        "server-url",
        "token",
        "tokens",
        "head",
        "client-layers",  # the top layers the party keeps (U-shaped split)
        "clip-norm",
        "noise-multiplier",
        "noise-seed",
        "data-file",
        "data-files",
        "device",
        "dtype",
    }
)
"""Keys a party takes only from its own node config (or the code that builds its app), never from
the run config: with them the run's operator could send the party's states and token to its own
host, move its labels onto the wire, or turn off its noise."""
SECAGG_STATE = "secaggplus_state"
"""ConfigRecord in the party's Context where Flower's `secaggplus_mod` keeps its state."""


def refuse_party_keys(run_config: FlowerConfig) -> None:
    """Raise `ConfigError` when the run config sets a key of `PARTY_ONLY_KEYS` ("" is unset)."""
    overridden = sorted(k for k, v in run_config.items() if k in PARTY_ONLY_KEYS and v != "")
    if overridden:
        raise ConfigError(
            f"the run config sets {overridden}, which a party takes only from its own node config "
            "(--node-config of its SuperNode): the run's operator may not choose where a party sends "
            "its states and token, its head, its noise, its data or its emulator (the operator's own "
            "evaluation connection is set with operator-emulator-dir, operator-server-url, "
            "operator-token and operator-head)"
        )


def config_fields(cls: type, config: FlowerConfig, required: set[str], what: str) -> dict[str, Any]:
    """The dataclass `cls`'s fields from kebab-case Flower config keys; "" means unset.

    Raises `ConfigError` naming `what` when a field of `required` has no value.
    """
    known = {f.name for f in fields(cls)}
    values = {k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in known and v != ""}
    missing = sorted(required - set(values))
    if missing:
        raise ConfigError(f"{what} lacks {[m.replace('_', '-') for m in missing]}")
    return values


@dataclass(frozen=True)
class PartyConfig:
    """One data party's settings for every round."""

    emulator_dir: str
    """The emulator this party received from the model party."""
    server_url: str
    """Base URL of the model party's `splitprefix serve`."""
    data_file: str
    """This party's training JSONL file."""
    head: HeadMode = "client"
    """Where the final norm and LM head run ('client', the default, keeps the targets off the wire)."""
    client_layers: int = 0
    """M: also keep the top M layers here (the U-shaped split; head=client, an emulator that ships them)."""
    token: str | None = None
    """Bearer token the model party issued to this party."""
    clip_norm: float | None = None
    """C: each token's layer-K state is clipped to this L2 norm before it leaves; None = off."""
    noise_multiplier: float = 0.0
    """sigma: Gaussian noise of std sigma * C on every sent coordinate (needs clip_norm)."""
    noise_seed: int | None = None
    """None = fresh noise from the OS's cryptographic source; an int replays it (tests only)."""
    local_steps: int = 10
    """Optimiser steps per round (ignored when local_epochs is set)."""
    local_epochs: float | None = None
    """Passes over the party's data per round; overrides local_steps."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 0.1
    """Peak AdamW learning rate of each round."""
    warmup_steps: int = 0
    """Linear warm-up steps at the start of each round."""
    max_length: int = 128
    """Tokens kept per example."""
    seed: int = 0
    """Seed of the data order; round r uses seed + r, so rounds see different batches."""
    device: str = "cpu"
    """Torch device of this party's model parts (cpu, cuda, cuda:N, mps)."""
    dtype: DtypeName = "fp32"
    """Dtype of this party's frozen model parts (the prefix stays fp32)."""

    def __post_init__(self) -> None:
        if self.local_epochs is not None and self.local_epochs <= 0:
            raise ConfigError(f"local_epochs must be > 0; got {self.local_epochs}")
        self.train_config(1)  # validates steps, batch size and lr
        self.privacy()  # validates clip and noise
        self.runtime()  # validates the device and dtype

    def runtime(self) -> RuntimeSettings:
        return RuntimeSettings(self.device, self.dtype)

    @classmethod
    def from_flower(
        cls, run_config: FlowerConfig, node_config: FlowerConfig, defaults: FlowerConfig | None = None
    ) -> PartyConfig:
        """Fields from kebab-case keys (`emulator-dir`, `local-steps`, ...).

        `defaults` (set by the code that builds this party's app) are overridden by the run
        config, then by `node_config`; `refuse_party_keys` stops the run config from setting a
        `PARTY_ONLY_KEYS` one, so those are the party's own. An empty string means unset. Without
        `data-file`, the party takes entry `partition-id` of the comma-separated `data-files`;
        likewise `token` from `tokens`.
        """
        refuse_party_keys(run_config)
        merged = {**(defaults or {}), **run_config, **node_config}
        for one, many in (("data-file", "data-files"), ("token", "tokens")):
            if one not in merged and many in merged:
                entries = str(merged[many]).split(",")
                index = int(merged.get("partition-id", -1))
                if not 0 <= index < len(entries):
                    raise ConfigError(f"partition-id {index} has no entry in {many} ({len(entries)} entries)")
                merged[one] = entries[index].strip()
        values = config_fields(cls, merged, {"emulator_dir", "server_url", "data_file"}, "the party's config")
        return cls(**values)

    def client_settings(self) -> ClientSettings:
        return ClientSettings(
            self.server_url, token=self.token, head=self.head, client_layers=self.client_layers
        )

    def privacy(self) -> PrivacyConfig | None:
        """The clipping and noise on this party's sent states; None when off."""
        if self.clip_norm is None and self.noise_multiplier == 0:
            return None
        return PrivacyConfig(self.clip_norm, self.noise_multiplier, self.noise_seed)

    def train_config(self, server_round: int) -> TrainConfig:
        return TrainConfig(
            steps=self.local_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            seed=self.seed + server_round,
            checkpoint_every=0,
        )


class PartyRound(NamedTuple):
    """What a party sends back after one round."""

    kv: torch.Tensor
    """The refined prefix, (L, 2, n_kv, P, head_dim)."""
    num_examples: int
    """Examples the loss saw this round, counted once per step they were drawn in."""
    train_loss: float
    """Mean of the round's per-step token losses."""


def train_round(config: PartyConfig, kv: torch.Tensor, server_round: int) -> PartyRound:
    """Refine the joint prefix `kv` (L, 2, n_kv, P, head_dim) through the split on this party's data.

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
        train = steps_for(config.train_config(server_round), config.local_epochs, len(examples))
        encoded = encode_examples(session.tokenizer, examples, config.max_length)
        seen = [0]
        loss_fn = _counting(session.loss_fn(), seen)
        history = train_prefix(
            prefix, loss_fn, encoded, resolve_pad_id(session.tokenizer), train, desc=f"round {server_round}"
        )
    finally:
        session.close()
    _log_privacy(config, [len(e) for e in encoded], train, server_round)
    return PartyRound(prefix().detach(), seen[0], sum(history.losses) / len(history.losses))


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
        result = train_round(config, torch.from_numpy(kv.copy()), server_round)
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
        result = train_round(self.config, torch.from_numpy(parameters[0].copy()), server_round)
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
