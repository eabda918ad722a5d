"""A party's training settings per round: its local optimiser and its lr schedule across rounds."""

from __future__ import annotations

import pytest

from splitprefix.data_party.train import TrainConfig, lr_at
from splitprefix.errors import ConfigError
from splitprefix.federation.config import FederationConfig, PartyConfig


def party(**fields: object) -> PartyConfig:
    return PartyConfig("emu", "http://x", "data.jsonl", **fields)  # type: ignore[arg-type]


def multipliers(config: TrainConfig) -> list[float]:
    return [lr_at(config.schedule_start + s, config) for s in range(config.steps)]


def test_the_run_schedule_spreads_one_warm_up_and_decay_over_the_rounds():
    # Prepare: 3 rounds of 4 steps, warm-up 2
    config = party(local_steps=4, warmup_steps=2, lr_schedule="run", num_rounds=3)

    # Execute
    rounds = [config.train_config(r) for r in (1, 2, 3)]

    # Assert: the rounds' lrs are one 12-step schedule cut in three
    whole = TrainConfig(steps=12, warmup_steps=2)
    assert [r.schedule_start for r in rounds] == [0, 4, 8]
    assert [m for r in rounds for m in multipliers(r)] == pytest.approx(multipliers(whole))


def test_the_defaults_are_the_best_measured_federation():
    # FedAvg by count, AdamW afresh each round, many rounds of few local steps
    server = FederationConfig("emu", "http://x", "o")
    assert (server.strategy, server.num_rounds, server.local_steps) == ("fedavg", 25, 2)
    assert (party().lr_schedule, party().optimizer, party().keep_optimizer_state) == ("round", "adamw", False)


def test_the_round_schedule_starts_again_each_round():
    config = party(local_steps=4, warmup_steps=2, lr_schedule="round")

    first, second = config.train_config(1), config.train_config(2)

    assert multipliers(first) == multipliers(second) == multipliers(TrainConfig(steps=4, warmup_steps=2))
    assert (first.seed, second.seed) == (1, 2)  # other batches each round


def test_a_round_past_the_run_keeps_the_last_piece_and_epochs_set_the_steps():
    config = party(local_epochs=2.0, batch_size=4, lr_schedule="run", num_rounds=2)

    late = config.train_config(5, n_train=10)

    assert (late.steps, late.schedule_steps, late.schedule_start) == (5, 10, 5)


def test_the_run_config_sets_the_optimiser_and_schedule():
    run = {"optimizer": "sgd", "lr-schedule": "run", "num-rounds": 4, "lr": 20.0}

    config = PartyConfig.from_flower(run, {"emulator-dir": "e", "server-url": "http://x", "data-file": "d"})

    assert (config.optimizer, config.lr_schedule, config.num_rounds) == ("sgd", "run", 4)
    assert config.train_config(1).optimizer == "sgd"


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"lr_schedule": "cosine"}, "lr_schedule must be"), ({"optimizer": "adam"}, "optimizer must be")],
)
def test_bad_party_training_settings_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        party(**fields)
