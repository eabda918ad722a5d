"""A federation's settings: each party's own (`PartyConfig`) and the run's (`FederationConfig`).

Both are read from Flower's kebab-case configs; a party's security-relevant settings come only
from its own node config. This module imports no Flower code, so the command line can build its
options from these dataclasses cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.train import OptimizerName, TrainConfig
from splitprefix.errors import ConfigError
from splitprefix.fields import from_kebab
from splitprefix.runtime import DtypeName, RuntimeSettings
from splitprefix.wire.schemas import HeadMode

FlowerConfig = Mapping[str, bool | float | int | str]
LrSchedule = Literal["round", "run"]
StrategyName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
STRATEGY_NAMES: tuple[StrategyName, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

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
    values = from_kebab(cls, config)
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
    """Where the final norm and LM head run: 'client' keeps the targets off the wire (the model party can
    still recover them from the gradients it is sent); 'server' sends them."""
    client_layers: int = 0
    """M: also keep the top M layers here (the U-shaped split; head=client, an emulator that ships them)."""
    token: str | None = None
    """Bearer token the model party issued to this party."""
    clip_norm: float | None = None
    """C: each token's layer-K state is clipped to this L2 norm before it leaves; unset = off."""
    noise_multiplier: float = 0.0
    """sigma: Gaussian noise of std sigma * C on every sent coordinate (needs `clip_norm`)."""
    noise_seed: int | None = None
    """Unset = fresh noise from the OS's cryptographic source; an int replays it (tests only)."""
    local_steps: int = 2
    """Optimiser steps per round (ignored when `local_epochs` is set). Few steps in many rounds came
    closest to the central prefix (docs/guides/federation-strategies.md)."""
    local_epochs: float | None = None
    """Passes over the party's data per round; overrides `local_steps`."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 0.1
    """Peak learning rate of the party's optimiser."""
    optimizer: OptimizerName = "adamw"
    """The party's local optimiser: 'adamw', or plain 'sgd' (its steps scale with the gradient)."""
    keep_optimizer_state: bool = False
    """Keep the optimiser's moments from round to round (in the party's Flower context, never sent);
    False starts AdamW afresh every round."""
    lr_schedule: LrSchedule = "round"
    """'round' (the default, best measured: docs/guides/federation-strategies.md): each round warms up and decays
    from the peak lr; 'run': one warm-up and cosine over all rounds, each round taking its slice."""
    num_rounds: int = 25
    """Rounds in the run (from the run config's num-rounds): the length of the 'run' schedule."""
    warmup_steps: int = 0
    """Linear warm-up steps at the start of each round ('round') or of the run ('run')."""
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
        if self.lr_schedule not in ("round", "run") or self.num_rounds < 1:
            raise ConfigError(
                f"lr_schedule must be 'round' or 'run' and num_rounds >= 1; got {self.lr_schedule!r}, {self.num_rounds}"
            )
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

    def train_config(self, server_round: int, n_train: int | None = None) -> TrainConfig:
        """Round `server_round`'s training on `n_train` examples (needed with local_epochs).

        With lr_schedule 'run', round r (1-based) takes steps [(r-1) S, r S) of one schedule of
        num_rounds x S steps, S this round's steps; a round past num_rounds keeps the last lr.
        """
        steps = self.local_steps
        if self.local_epochs is not None and n_train is not None:
            steps = max(1, math.ceil(self.local_epochs * n_train / self.batch_size))
        schedule: dict[str, int] = {}
        if self.lr_schedule == "run":
            done = min(max(server_round, 1), self.num_rounds) - 1
            schedule = {"schedule_steps": self.num_rounds * steps, "schedule_start": done * steps}
        return TrainConfig(
            steps=steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            seed=self.seed + server_round,
            checkpoint_every=0,
            optimizer=self.optimizer,
            **schedule,
        )


OPERATOR_PREFIX = "operator-"
OPERATOR_KEYS = ("emulator-dir", "server-url", "token", "head")
"""The operator's own connection, for its held-out evaluation: `operator-` + one of these."""


@dataclass(frozen=True)
class FederationConfig:
    """The operator's settings for a federation."""

    emulator_dir: str
    """The operator's emulator: it gives the prefix layout and runs the held-out evaluation."""
    server_url: str
    """Base URL of the model party's server."""
    out_dir: str
    """Where the joint prefix, `state.json` and `rounds.jsonl` go."""
    num_rounds: int = 25
    """Rounds in all, counting those of a resumed run (25 rounds of 2 local steps by default: the measured best)."""
    min_parties: int = 2
    """Parties that must be connected before a round starts; all of them are sampled."""
    min_replies: int = 1
    """Successful replies a round needs to change the joint prefix; fewer keep the old one."""
    prefix_len: int = 16
    """Virtual tokens P of a fresh prefix (ignored with `init`)."""
    init: str | None = None
    """Full-layout prefix directory to start from; unset = seeded random."""
    eval_data: str | None = None
    """Operator's held-out JSONL, evaluated after every round; unset = no evaluation."""
    exact_match: bool = False
    """Also generate and score exact match in each evaluation (slower)."""
    max_length: int = 128
    """Tokens kept per evaluation example."""
    head: HeadMode = "client"
    """Where the operator's evaluation runs the final norm and LM head."""
    token: str | None = None
    """Bearer token of the operator at the model party's server."""
    round_timeout_s: float = 3600.0
    """Seconds a round waits for the parties' replies."""
    seed: int = 0
    """Seed of the fresh prefix."""
    secure: bool = False
    """Aggregate with SecAgg+: the server learns only the weighted sum (parties run `secure_app`)."""
    secagg_max_weight: float = 1000.0
    """SecAgg+: the largest num-examples a party reports in a round; keep it tight (docs/guides/federation-operator.md)."""
    secagg_clipping_range: float = 8.0
    """SecAgg+: prefix values are clipped to [-range, range] before quantisation."""
    secagg_threshold: float = 0.67
    """SecAgg+: share of the key shares needed to unmask; more is more private, less drop-tolerant."""
    local_steps: int = PartyConfig.local_steps
    """The parties' optimiser steps per round (from the run config): bounds their num-examples."""
    batch_size: int = PartyConfig.batch_size
    """The parties' examples per step (from the run config): bounds their num-examples."""
    local_epochs: float | None = None
    """The parties' passes over their data per round, when the run config sets it."""
    max_examples: int = 0
    """Largest num-examples a party may report per round; 0 = `local_steps` x `batch_size`."""
    strategy: StrategyName = "fedavg"
    """Aggregation: 'fedavg' (the example-weighted mean, the reference), or a Flower server optimiser
    on that mean's step: 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad' (docs/guides/federation-strategies.md)."""
    server_lr: float = 1.0
    """The server optimiser's learning rate (FedAvgM's server_learning_rate, FedOpt's eta)."""
    server_momentum: float = 0.0
    """FedAvgM's server momentum."""
    server_tau: float = 1e-3
    """FedAdam/FedYogi/FedAdagrad's tau, the floor under their adaptive denominators."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGY_NAMES)}; got {self.strategy!r}")
        if not (self.server_lr > 0 and self.server_tau > 0 and 0 <= self.server_momentum < 1):
            raise ConfigError(
                "server_lr and server_tau must be > 0 and server_momentum in [0, 1); got "
                f"{self.server_lr}, {self.server_tau}, {self.server_momentum}"
            )
        if self.num_rounds < 1 or self.min_parties < 1 or self.min_replies < 1:
            raise ConfigError(
                "num_rounds, min_parties and min_replies must be >= 1; got "
                f"{self.num_rounds}, {self.min_parties}, {self.min_replies}"
            )
        if self.min_replies > self.min_parties:
            raise ConfigError(f"min_replies {self.min_replies} exceeds min_parties {self.min_parties}")
        if self.secagg_max_weight <= 0 or self.secagg_clipping_range <= 0:
            raise ConfigError(
                "secagg_max_weight and secagg_clipping_range must be > 0; got "
                f"{self.secagg_max_weight}, {self.secagg_clipping_range}"
            )
        if not 0 < self.secagg_threshold <= 1:
            raise ConfigError(f"secagg_threshold must be in (0, 1]; got {self.secagg_threshold}")
        if self.max_examples < 0 or (self.local_epochs is not None and self.max_examples == 0):
            raise ConfigError(
                f"max_examples must be >= 1, or 0 for local_steps x batch_size without local_epochs; got "
                f"{self.max_examples} with local_epochs {self.local_epochs} (a party's count then "
                "depends on its data size, which the server does not know)"
            )

    @property
    def examples_bound(self) -> int:
        """The largest num-examples a party may report in a round."""
        return self.max_examples or self.local_steps * self.batch_size

    @classmethod
    def from_flower(cls, run_config: FlowerConfig) -> FederationConfig:
        """Fields from kebab-case run-config keys (`operator-server-url`, `num-rounds`, ...); "" means unset.

        The operator's emulator, server URL, token and head are `operator-*` keys, because the
        parties refuse a run config that sets their own (`PARTY_ONLY_KEYS`).
        """
        refuse_party_keys(run_config)
        renamed = {
            (k.removeprefix(OPERATOR_PREFIX) if k.removeprefix(OPERATOR_PREFIX) in OPERATOR_KEYS else k): v
            for k, v in run_config.items()
        }
        required = {"emulator_dir", "server_url", "out_dir"}
        values = config_fields(cls, renamed, required, "the run config (operator-emulator-dir, ...)")
        return cls(**values)
