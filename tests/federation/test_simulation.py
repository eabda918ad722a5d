"""A whole federation in Flower's simulation engine, against a real model-party server on loopback."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.simulation import run_simulation

from live_server import LiveServer
from split_helpers import EXAMPLES, server_settings, write_jsonl
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.federation import weighted_average
from splitprefix.federation.client_app import make_client_app, make_secure_client_app, train_round
from splitprefix.federation.config import FederationConfig, PartyConfig
from splitprefix.federation.server_app import make_server_app, resume_or_init
from splitprefix.model.prefix import Prefix
from splitprefix.model_party.app import create_app

SIZES = (2, 4, 6)
"""Examples per party: unequal, so that the FedAvg weights differ."""


def simulate(server_config: dict, party_config: dict, parties: int, secure: bool = False) -> None:
    make_client = make_secure_client_app if secure else make_client_app
    run_simulation(
        server_app=make_server_app(server_config),
        client_app=make_client(party_config),
        num_supernodes=parties,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": "ERROR"},
        },
    )


def replay_round(
    party: dict, kv: torch.Tensor, server_round: int, parties: tuple[int, ...] = (0, 1, 2)
) -> torch.Tensor:
    """What the federation should make of `kv` in one round: each party's training, weighted."""
    results = [
        train_round(PartyConfig.from_flower({}, {"partition-id": i}, party), kv, server_round)
        for i in parties
    ]
    assert [r.num_examples for r in results] == [SIZES[i] for i in parties]
    return weighted_average([r.kv for r in results], [r.num_examples for r in results])


def configs(dirs, url: str, files: list, out, **server: object) -> tuple[dict, dict]:
    """(party config, server config) of a one-epoch-per-round federation over `files`."""
    party = {
        "emulator-dir": str(dirs.emulator),
        "server-url": url,
        "data-files": ",".join(map(str, files)),
        "local-epochs": 1.0,
        "batch-size": 2,
    }
    base = {
        "operator-emulator-dir": str(dirs.emulator),
        "operator-server-url": url,
        "out-dir": str(out),
        "prefix-len": 2,
    }
    return party, base | {"min-parties": 3} | server


def read_rounds(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_three_parties_two_rounds_give_the_example_weighted_mean(dirs, tmp_path):
    # Prepare: three parties with 2, 4 and 6 examples, one epoch each per round
    files = [write_jsonl(tmp_path / f"party{i}.jsonl", EXAMPLES[:n]) for i, n in enumerate(SIZES)]
    out = tmp_path / "federation"
    with LiveServer(create_app(server_settings(dirs))) as live:
        party = {
            "emulator-dir": str(dirs.emulator),
            "server-url": live.url,
            "data-files": ",".join(map(str, files)),
            "local-epochs": 1.0,
            "batch-size": 2,
        }
        server = {
            "operator-emulator-dir": str(dirs.emulator),
            "operator-server-url": live.url,
            "out-dir": str(out),
            "num-rounds": 2,
            "min-parties": 3,
            "prefix-len": 2,
            "eval-data": str(files[2]),
        }

        # Execute
        simulate(server, party, 3)
        start = _starting_kv(dirs, live.url, tmp_path)
        expected = replay_round(party, replay_round(party, start, 1), 2)

    # Assert: the joint prefix is the example-weighted mean of the parties' prefixes, both rounds
    torch.testing.assert_close(Prefix.load(out / "prefix")().detach(), expected, atol=1e-5, rtol=1e-5)
    rounds = read_rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["parties"] == 3 and r["failed"] == 0 and "eval-loss" in r for r in rounds)
    assert rounds[0]["bytes_received"] > 3 * expected.numel() * 4  # three fp32 prefixes came back
    assert rounds[1]["bytes_sent"] > rounds[0]["bytes_sent"]  # counted over the run
    assert json.loads((out / "state.json").read_text()) == {"round": 2}


@pytest.mark.parametrize("secure", [False, True], ids=["fedavg", "secagg"])
def test_a_resumed_run_goes_on_as_an_uninterrupted_one(dirs, tmp_path, secure):
    # Prepare: one-epoch rounds of 2-example batches, so each round's data order (seed + round) matters
    files = [write_jsonl(tmp_path / f"party{i}.jsonl", EXAMPLES[:n]) for i, n in enumerate(SIZES)]
    out = tmp_path / "federation"
    with LiveServer(create_app(server_settings(dirs))) as live:
        options = {"secure": True, "secagg-max-weight": float(max(SIZES))} if secure else {}
        party, first = configs(dirs, live.url, files, out, **{"num-rounds": 1, **options})

        # Execute: one round, then a rerun that asks for two
        simulate(first, party, 3, secure)
        simulate(first | {"num-rounds": 2}, party, 3, secure)
        start = _starting_kv(dirs, live.url, tmp_path)
        expected = replay_round(party, replay_round(party, start, 1), 2)

    # Assert: the parties trained round 2 on round 2's batches, and the log counts on
    atol = 4e-5 if secure else 1e-5  # SecAgg+ quantises each round's sum (~1e-5)
    torch.testing.assert_close(Prefix.load(out / "prefix")().detach(), expected, atol=atol, rtol=1e-5)
    assert [r["round"] for r in read_rounds(out)] == [1, 2]


def test_a_party_that_fails_mid_round_is_logged_and_the_others_are_averaged(dirs, tmp_path):
    # Prepare: party 1's file breaks after its 4 records, so that party raises once its round starts
    files = [write_jsonl(tmp_path / f"party{i}.jsonl", EXAMPLES[:n]) for i, n in enumerate(SIZES)]
    files[1].write_text(files[1].read_text() + "{not json\n")
    out = tmp_path / "federation"
    with LiveServer(create_app(server_settings(dirs))) as live:
        party, server = configs(dirs, live.url, files, out, **{"num-rounds": 1, "min-replies": 2})

        # Execute
        simulate(server, party, 3)
        expected = replay_round(party, _starting_kv(dirs, live.url, tmp_path), 1, parties=(0, 2))

    # Assert: the round completed with parties 0 and 2, and the failure is in the round's record
    torch.testing.assert_close(Prefix.load(out / "prefix")().detach(), expected, atol=1e-5, rtol=1e-5)
    (record,) = read_rounds(out)
    assert (record["parties"], record["failed"]) == (2, 1)
    assert "party1.jsonl:5" in record["errors"][0]


def test_secure_aggregation_gives_the_plain_weighted_average(dirs, tmp_path):
    # Prepare: SecAgg+ with max-weight tight on the largest count, so quantisation stays ~1e-6
    files = [write_jsonl(tmp_path / f"party{i}.jsonl", EXAMPLES[:n]) for i, n in enumerate(SIZES)]
    out = tmp_path / "federation"
    with LiveServer(create_app(server_settings(dirs))) as live:
        secure = {"num-rounds": 1, "secure": True, "secagg-max-weight": float(max(SIZES))}
        party, server = configs(dirs, live.url, files, out, **secure)

        # Execute
        simulate(server, party, 3, secure=True)
        expected = replay_round(party, _starting_kv(dirs, live.url, tmp_path), 1)

    # Assert: the unmasked sum over the weights is FedAvg's, to the quantisation step
    joint = Prefix.load(out / "prefix")().detach()
    assert joint.dtype == torch.float32  # SecAgg+ dequantises to float64; the parties train in float32
    torch.testing.assert_close(joint, expected, atol=2e-5, rtol=0)
    (record,) = read_rounds(out)
    assert (record["parties"], record["failed"]) == (3, 0)


def test_secure_aggregation_runs_a_server_optimiser_on_the_unmasked_mean(dirs, tmp_path):
    # Prepare: SecAgg+ with FedAdam: one round steps from the start towards the weighted mean
    files = [write_jsonl(tmp_path / f"party{i}.jsonl", EXAMPLES[:n]) for i, n in enumerate(SIZES)]
    out = tmp_path / "federation"
    with LiveServer(create_app(server_settings(dirs))) as live:
        adam = {"strategy": "fedadam", "server-lr": 0.05, "server-tau": 1e-3}
        secure = {"num-rounds": 1, "secure": True, "secagg-max-weight": float(max(SIZES)), **adam}
        party, server = configs(dirs, live.url, files, out, **secure)

        # Execute
        simulate(server, party, 3, secure=True)
        start = _starting_kv(dirs, live.url, tmp_path)
        mean = replay_round(party, start, 1)

    # Assert: Flower's first FedAdam step, m = 0.1 d, v = 0.01 d^2, on the mean's step d
    step = mean.double() - start.double()
    eta = 0.05 * (1 - 0.99**2) ** 0.5 / (1 - 0.9**2)
    expected = start.double() + eta * 0.1 * step / ((0.01 * step**2).sqrt() + 1e-3)
    joint = Prefix.load(out / "prefix")().detach()
    torch.testing.assert_close(joint.double(), expected, atol=2e-4, rtol=0)
    assert not torch.allclose(joint, mean, atol=1e-3)  # not the plain mean


def _starting_kv(dirs, url: str, tmp_path) -> torch.Tensor:
    """The fresh joint prefix the server starts from (same seed and length)."""
    config = FederationConfig(str(dirs.emulator), url, str(tmp_path / "unused"), prefix_len=2)
    session = open_split(dirs.emulator, ClientSettings(url))
    try:
        return resume_or_init(session, config)[1]().detach()
    finally:
        session.close()
