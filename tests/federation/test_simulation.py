"""A whole federation in Flower's simulation engine, against a real model-party server on loopback."""

from __future__ import annotations

import json

import torch
from flwr.simulation import run_simulation

from live_server import LiveServer
from split_helpers import EXAMPLES, server_settings, write_jsonl
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.split_train import open_split
from splitprefix.federation import weighted_average
from splitprefix.federation.client_app import PartyConfig, make_client_app, train_round
from splitprefix.federation.server_app import FederationConfig, make_server_app, resume_or_init
from splitprefix.model.prefix import Prefix
from splitprefix.model_party.app import create_app

SIZES = (2, 4, 6)
"""Examples per party: unequal, so that the FedAvg weights differ."""


def simulate(server_config: dict, party_config: dict, parties: int) -> None:
    run_simulation(
        server_app=make_server_app(server_config),
        client_app=make_client_app(party_config),
        num_supernodes=parties,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": "ERROR"},
        },
    )


def replay_round(party: dict, kv: torch.Tensor, server_round: int) -> torch.Tensor:
    """What the federation should make of `kv` in one round: each party's training, weighted."""
    results = [
        train_round(PartyConfig.from_flower(party, {"partition-id": i}), kv, server_round) for i in range(3)
    ]
    assert [r.num_examples for r in results] == list(SIZES)
    return weighted_average([r.kv for r in results], [r.num_examples for r in results])


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
            "emulator-dir": str(dirs.emulator),
            "server-url": live.url,
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
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["parties"] == 3 and r["failed"] == 0 and "eval-loss" in r for r in rounds)
    assert json.loads((out / "state.json").read_text()) == {"round": 2}


def _starting_kv(dirs, url: str, tmp_path) -> torch.Tensor:
    """The fresh joint prefix the server starts from (same seed and length)."""
    config = FederationConfig(str(dirs.emulator), url, str(tmp_path / "unused"), prefix_len=2)
    session = open_split(dirs.emulator, ClientSettings(url))
    try:
        return resume_or_init(session, config)[1]().detach()
    finally:
        session.close()
