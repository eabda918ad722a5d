"""The Flower apps against a real model-party server on loopback, with tiny models."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from split_helpers import EXAMPLES, write_jsonl
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.errors import ConfigError
from splitprefix.federation.client_app import (
    MOMENTS,
    SECAGG_STATE,
    _SecureParty,
    check_weight,
    make_client_app,
    round_number,
    secagg_max_weight,
)
from splitprefix.federation.config import FederationConfig, PartyConfig
from splitprefix.federation.server_app import PREFIX_DIR, STATE_FILE, resume_or_init
from splitprefix.federation.strategies import make_strategy
from splitprefix.model.loading import load_causal_lm
from splitprefix.model.prefix import Prefix, PrefixConfig


@pytest.fixture
def as_superlink(monkeypatch):
    """The process identity Flower sets before it builds messages, as its SuperLink would."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def joint_kv(dirs, prefix_len: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(PrefixConfig.for_model(load_causal_lm(dirs.full).config, prefix_len).kv_shape)


def train_message(kv: torch.Tensor, server_round: int = 1) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({"kv": kv}), "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content, dst_node_id=1, message_type="train")


def party_context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


@pytest.mark.parametrize(
    ("local", "expected_examples"),
    [({"local-steps": 3}, 4 + 2 + 4), ({"local-epochs": 1.0}, 4 + 2)],
    ids=["steps", "one-epoch"],
)
def test_client_app_replies_with_its_prefix_and_example_count(
    dirs, server, tmp_path, as_superlink, local, expected_examples
):
    # Prepare: 6 examples in batches of 4: each epoch is a full batch, then a short one
    data = write_jsonl(tmp_path / "party.jsonl", EXAMPLES[:6])
    own = {"emulator-dir": str(dirs.emulator), "server-url": server.url, "data-file": str(data)}
    kv = joint_kv(dirs)
    app = make_client_app()

    # Execute
    reply = app(train_message(kv), party_context({"batch-size": 4, **local}, own))

    # Assert
    assert not reply.has_error()
    returned = torch.from_numpy(reply.content["arrays"]["kv"].numpy())
    metrics = reply.content["metrics"]
    assert returned.shape == kv.shape
    assert not torch.equal(returned, kv)  # it trained
    assert metrics["num-examples"] == expected_examples
    assert math.isfinite(metrics["train-loss"])


def test_a_party_that_keeps_its_optimiser_state_carries_it_over_in_its_context_only(
    dirs, server, tmp_path, as_superlink
):
    # Prepare: two rounds of 2 AdamW steps in one party context (Flower keeps it between rounds)
    data = write_jsonl(tmp_path / "party.jsonl", EXAMPLES[:4])
    own = {"emulator-dir": str(dirs.emulator), "server-url": server.url, "data-file": str(data)}
    run = {
        "batch-size": 2,
        "local-steps": 2,
        "keep-optimizer-state": True,
        "lr-schedule": "run",
        "num-rounds": 2,
    }
    context = party_context(run, own)
    app = make_client_app()

    # Execute
    first = app(train_message(joint_kv(dirs), 1), context)
    after_first = context.state.array_records[MOMENTS]["0.step"].numpy().item()
    second = app(train_message(joint_kv(dirs), 2), context)

    # Assert: AdamW counted on across rounds; the moments stayed in the context, off the reply
    assert not first.has_error() and not second.has_error()
    assert (after_first, context.state.array_records[MOMENTS]["0.step"].numpy().item()) == (2, 4)
    assert list(second.content["arrays"].keys()) == ["kv"]
    plain = party_context(run | {"keep-optimizer-state": False}, own)
    assert not app(train_message(joint_kv(dirs), 1), plain).has_error()
    assert MOMENTS not in plain.state.array_records


OWN = {"emulator-dir": "emu", "server-url": "http://127.0.0.1:1", "data-file": "a.jsonl"}
"""A party's own settings, as its node config (or its app's defaults) gives them."""


def test_a_party_takes_its_file_from_data_files_by_partition_id():
    defaults = {"emulator-dir": "emu", "server-url": "http://127.0.0.1:1", "data-files": "a.jsonl, b.jsonl"}

    config = PartyConfig.from_flower({}, {"partition-id": 1, "num-partitions": 2}, defaults)

    assert config.data_file == "b.jsonl"


def test_a_party_takes_its_token_from_tokens_by_partition_id():
    config = PartyConfig.from_flower({}, {"partition-id": 2}, OWN | {"tokens": "t0,t1,t2"})

    assert config.token == "t2"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server-url", "http://attacker.example:8000"),
        ("token", "stolen"),
        ("head", "server"),
        ("noise-multiplier", 0.0),
        ("clip-norm", 1e9),
        ("data-file", "/etc/passwd"),
        ("emulator-dir", "/tmp/evil"),
        ("tokens", "a,b"),
        ("client-layers", 0),
    ],
)
def test_a_run_config_that_sets_a_partys_own_setting_is_refused(key, value):
    # Prepare: the attack: the run's operator points the party elsewhere, or turns its protection off
    run_config = {"local-steps": 3, key: value}

    # Execute / Assert: refused with the key named, even where the node config sets it too
    with pytest.raises(ConfigError, match=f"the run config sets \\['{key}'\\].*node config"):
        PartyConfig.from_flower(run_config, OWN)


def test_the_run_config_still_sets_the_training_and_the_node_config_wins():
    config = PartyConfig.from_flower({"local-steps": 3, "lr": 0.5, "server-url": ""}, OWN | {"lr": 0.2})

    assert (config.local_steps, config.lr, config.server_url) == (3, 0.2, "http://127.0.0.1:1")


def test_a_party_fails_closed_and_keeps_its_privacy_options_in_its_node_config():
    default = PartyConfig.from_flower({}, OWN)
    noisy = PartyConfig.from_flower({}, OWN | {"clip-norm": 2.0, "noise-multiplier": 0.5})

    assert default.head == "client" and default.privacy() is None
    privacy = noisy.privacy()
    assert privacy is not None and (privacy.clip_norm, privacy.noise_multiplier, privacy.seed) == (
        2.0,
        0.5,
        None,
    )
    with pytest.raises(ConfigError, match="needs clip_norm"):
        PartyConfig.from_flower({}, OWN | {"noise-multiplier": 0.5})


def test_a_party_keeps_its_top_layers_from_its_node_config():
    config = PartyConfig.from_flower({}, OWN | {"client-layers": 2})

    assert config.client_layers == 2 and config.client_settings().client_layers == 2
    assert PartyConfig.from_flower({}, OWN).client_settings().client_layers == 0


def test_a_client_app_refuses_a_run_config_that_redirects_it(as_superlink):
    # Flower turns the exception into the party's error reply, which the server logs with the round
    app = make_client_app()
    context = party_context({"server-url": "http://attacker.example:8000"}, OWN)

    with pytest.raises(ConfigError, match="server-url"):
        app(train_message(torch.zeros(1, 2, 1, 1, 1)), context)


def test_a_secure_party_over_max_weight_fails_before_masking(dirs, server, tmp_path):
    # Prepare: SecAgg+'s setup stage left max_weight 5 in the party's state; 3 steps of 4 draw 10 examples
    data = write_jsonl(tmp_path / "party.jsonl", EXAMPLES[:6])
    own = {"emulator-dir": str(dirs.emulator), "server-url": server.url, "data-file": str(data)}
    context = party_context({"local-steps": 3, "batch-size": 4}, own)
    context.state.config_records[SECAGG_STATE] = ConfigRecord({"max_weight": 5.0})
    party = _SecureParty(PartyConfig.from_flower(context.run_config, context.node_config), context)

    # Execute / Assert: a loud error instead of secaggplus_mod's warning and a corrupted joint prefix
    with pytest.raises(ConfigError, match=r"10 examples .* max-weight 5"):
        party.fit([joint_kv(dirs).numpy()], {"server-round": 1})


def test_the_weight_check_passes_at_the_bound_and_outside_secure_aggregation():
    context = party_context({}, OWN)
    assert secagg_max_weight(context) is None  # no SecAgg+ state: nothing to check
    context.state.config_records[SECAGG_STATE] = ConfigRecord({"max_weight": 5.0})
    assert secagg_max_weight(context) == 5.0
    check_weight(5, 5.0)
    check_weight(10**6, None)


def test_empty_strings_in_the_run_config_mean_unset():
    # Flower's pyproject run config cannot hold None; the deployment app writes "" instead
    run_config = {
        "operator-emulator-dir": "emu",
        "operator-server-url": "http://x",
        "out-dir": "o",
        "eval-data": "",
        "operator-token": "",
    }

    config = FederationConfig.from_flower(run_config)

    assert config.eval_data is None and config.token is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("secagg_max_weight", 0.0), ("secagg_clipping_range", -1.0), ("secagg_threshold", 1.5)],
)
def test_bad_secure_aggregation_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        FederationConfig("emu", "http://x", "o", **{field: value})


def test_a_round_number_that_is_not_an_int_is_refused():
    assert round_number({"server-round": 3}) == 3
    assert round_number({}) == 0
    with pytest.raises(ConfigError, match="server-round must be an int"):
        round_number({"server-round": "3"})


def test_a_party_without_its_data_says_what_is_missing():
    with pytest.raises(ConfigError, match="data-file"):
        PartyConfig.from_flower({}, {"emulator-dir": "emu", "server-url": "http://127.0.0.1:1"})


def test_the_operators_connection_has_keys_of_its_own():
    run_config = {"operator-emulator-dir": "emu", "operator-server-url": "http://x", "out-dir": "o"}

    config = FederationConfig.from_flower(run_config | {"operator-head": "server"})

    assert (config.emulator_dir, config.server_url, config.head) == ("emu", "http://x", "server")
    assert FederationConfig.from_flower(run_config).head == "client"  # fails closed
    with pytest.raises(ConfigError, match="server-url"):
        FederationConfig.from_flower(run_config | {"server-url": "http://x"})


def test_the_examples_bound_defaults_to_local_steps_times_batch_size():
    assert FederationConfig("emu", "http://x", "o", local_steps=5, batch_size=4).examples_bound == 20
    assert FederationConfig("emu", "http://x", "o", max_examples=7).examples_bound == 7
    with pytest.raises(ConfigError, match="max_examples"):
        FederationConfig("emu", "http://x", "o", local_epochs=1.0)


def test_a_report_of_too_many_examples_is_refused_and_recorded(as_superlink, caplog):
    # Prepare: the bound is 3 x 2 = 6; party 2 claims 10,000 examples to dominate the average
    strategy = make_strategy(
        FederationConfig(
            "emu", "http://x", "o", min_parties=3, local_steps=3, batch_size=2, strategy="fedavg"
        )
    )
    asked = [train_message(torch.zeros(1, 2, 1, 1, 1)) for _ in range(3)]
    replies = [
        Message(trained(torch.full((1, 2, 1, 1, 1), 1.0), 2), reply_to=asked[0]),
        Message(trained(torch.full((1, 2, 1, 1, 1), 3.0), 6), reply_to=asked[1]),
        Message(trained(torch.full((1, 2, 1, 1, 1), 99.0), 10_000), reply_to=asked[2]),
    ]

    # Execute
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: (2*1 + 6*3) / 8 = 2.5 from the two honest reports; the refusal is logged and recorded
    assert arrays is not None
    torch.testing.assert_close(torch.from_numpy(arrays["kv"].numpy()), torch.full((1, 2, 1, 1, 1), 2.5))
    assert (strategy.last_round["parties"], strategy.last_round["refused"]) == (2, 1)
    assert "10000" in strategy.last_round["errors"][0] and "[1, 6]" in strategy.last_round["errors"][0]
    assert "10000" in caplog.text


@pytest.mark.parametrize("count", [0, -3, 2.5, 81])
def test_a_count_that_is_no_int_in_range_is_refused(as_superlink, count):
    strategy = make_strategy(FederationConfig("emu", "http://x", "o", min_parties=1, strategy="fedavg"))
    reply = Message(
        trained(torch.ones(1, 2, 1, 1, 1), count), reply_to=train_message(torch.zeros(1, 2, 1, 1, 1))
    )

    assert strategy.aggregate_train(1, [reply]) == (None, None)
    assert strategy.last_round["refused"] == 1


def test_a_failed_party_is_logged_and_the_round_averages_the_others(as_superlink, caplog):
    # Prepare: three parties were asked; the second one raised mid-round
    strategy = make_strategy(
        FederationConfig("emu", "http://127.0.0.1:1", "out", min_parties=3, strategy="fedavg")
    )
    asked = [train_message(torch.zeros(1, 2, 1, 1, 1)) for _ in range(3)]
    replies = [
        Message(trained(torch.full((1, 2, 1, 1, 1), 1.0), 1), reply_to=asked[0]),
        Message(Error(code=0, reason="party crashed"), reply_to=asked[1]),
        Message(trained(torch.full((1, 2, 1, 1, 1), 5.0), 3), reply_to=asked[2]),
    ]

    # Execute
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: (1*1 + 3*5) / 4 = 4 from the two that replied; the failure is logged
    assert arrays is not None and metrics is not None
    torch.testing.assert_close(torch.from_numpy(arrays["kv"].numpy()), torch.full((1, 2, 1, 1, 1), 4.0))
    assert strategy.last_round["parties"] == 2 and strategy.last_round["failed"] == 1
    assert "party crashed" in caplog.text


def test_too_few_replies_keep_the_joint_prefix(as_superlink):
    strategy = make_strategy(
        FederationConfig("emu", "http://127.0.0.1:1", "out", min_parties=2, min_replies=2, strategy="fedavg")
    )
    asked = [train_message(torch.zeros(1, 2, 1, 1, 1)) for _ in range(2)]
    replies = [
        Message(trained(torch.ones(1, 2, 1, 1, 1), 1), reply_to=asked[0]),
        Message(Error(code=0, reason="party crashed"), reply_to=asked[1]),
    ]

    assert strategy.aggregate_train(1, replies) == (None, None)


def test_a_rerun_resumes_from_the_saved_joint_prefix(dirs, server, tmp_path):
    # Prepare: a run that saved its joint prefix after round 2
    out = tmp_path / "federation"
    saved = Prefix(PrefixConfig.for_model(load_causal_lm(dirs.full).config, 2))
    saved.save(out / PREFIX_DIR)
    (out / STATE_FILE).write_text(json.dumps({"round": 2}))
    session = open_split(dirs.emulator, ClientSettings(server.url))

    # Execute
    try:
        done, prefix = resume_or_init(session, FederationConfig(str(dirs.emulator), server.url, str(out)))
    finally:
        session.close()

    # Assert
    assert done == 2
    torch.testing.assert_close(prefix(), saved())


def trained(kv: torch.Tensor, num_examples: int) -> RecordDict:
    return RecordDict(
        {"arrays": ArrayRecord({"kv": kv}), "metrics": MetricRecord({"num-examples": num_examples})}
    )


def test_a_partys_node_config_clips_what_it_sends(dirs, server, tmp_path, as_superlink, monkeypatch):
    # Prepare: the party's own clip norm, far below the tiny model's state norms
    data = write_jsonl(tmp_path / "party.jsonl", EXAMPLES[:4])
    own = {"emulator-dir": str(dirs.emulator), "server-url": server.url, "data-file": str(data)}
    backend, sent = server.app.state.backend, []
    real = backend.forward
    monkeypatch.setattr(backend, "forward", lambda t, m, c: sent.append(t["hidden"]) or real(t, m, c))

    # Execute
    reply = make_client_app()(
        train_message(joint_kv(dirs)),
        party_context({"local-steps": 1, "batch-size": 4}, own | {"clip-norm": 0.05}),
    )

    # Assert: every real token left clipped to the party's C (padding is sent as zeros)
    assert not reply.has_error() and sent
    for hidden in sent:
        norms = hidden.norm(dim=-1)
        real = norms > 0
        assert real.any() and (norms[real] <= 0.05 * (1 + 1e-5)).all() and (norms[real] > 0.04).all()
