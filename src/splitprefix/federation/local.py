"""A whole federation on one machine: N data parties in Flower's simulation engine, one model party.

`run_local_federation` gives each party its own JSONL file (or cuts one file into N), starts the
model party's server in a child process unless one is given, runs the ServerApp and N ClientApps
in a Flower simulation, and writes `results.json` next to the joint prefix in `out_dir`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from splitprefix.data.formats import Example, load_jsonl, write_jsonl
from splitprefix.data.partition import dirichlet_partition
from splitprefix.errors import ConfigError
from splitprefix.federation.client_app import make_client_app, make_secure_client_app
from splitprefix.federation.config import PARTY_ONLY_KEYS, FederationConfig, FlowerConfig, PartyConfig
from splitprefix.federation.local_settings import LocalFederation
from splitprefix.federation.quiet import quiet_simulation
from splitprefix.federation.server_app import ROUNDS_FILE, make_server_app
from splitprefix.files import write_json
from splitprefix.model.emulator import EmulatorManifest
from splitprefix.model_party.child import serve_in_child

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
OPERATOR = "operator"


def party_files(run: LocalFederation) -> list[Path]:
    """The parties' files: the given ones, or `out_dir/parties/party-<k>.jsonl` cut from the one file."""
    if len(run.data_files) > 1 or run.num_parties == 1:
        return [Path(f) for f in run.data_files]
    examples = load_jsonl(run.data_files[0])
    labels = [_label(e) for e in examples]
    seed = int(run.flower.get("seed", 0))
    parts = dirichlet_partition(labels, run.num_parties, run.alpha, seed)
    files = [Path(run.out_dir) / "parties" / f"party-{k}.jsonl" for k in range(run.num_parties)]
    for path, part in zip(files, parts, strict=True):
        write_jsonl(path, [examples[i] for i in part])
    return files


def _label(example: Example) -> str:
    return str(example.label) if example.label is not None else example.completion


def run_local_federation(run: LocalFederation) -> dict[str, Any]:
    """Run the federation; returns (and writes to `out_dir/results.json`) rounds, wall time and bytes."""
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = party_files(run)
    if run.server_url is not None:
        return _federate(run, files, run.server_url, [run.token or ""] * len(files), run.token)
    split_at = EmulatorManifest.load(run.emulator_dir).split_at
    names = [f"party-{k}" for k in range(len(files))]
    assert run.model is not None
    with serve_in_child(run.model, split_at, out / "server", [*names, OPERATOR]) as child:
        logger.info("model-party server started at %s (log: %s)", child.url, out / "server" / "server.log")
        tokens = [child.tokens[n] for n in names]
        return _federate(run, files, child.url, tokens, child.tokens[OPERATOR])


def _federate(
    run: LocalFederation, files: list[Path], url: str, tokens: list[str], operator_token: str | None
) -> dict[str, Any]:
    # every party's own settings go into its app's defaults, which stand for its node config here
    party: FlowerConfig = {"emulator-dir": run.emulator_dir, "server-url": url, **run.flower}
    party = {**party, "data-files": ",".join(map(str, files))}
    if any(tokens):
        party = {**party, "tokens": ",".join(tokens)}
    shared = {k: v for k, v in run.flower.items() if k not in PARTY_ONLY_KEYS}
    server: dict[str, bool | float | int | str] = {
        "min-parties": len(files),
        **shared,
        "operator-emulator-dir": run.emulator_dir,
        "operator-server-url": url,
        "operator-head": run.flower.get("head", FederationConfig.head),
        "out-dir": run.out_dir,
    }
    if "local-epochs" in run.flower and "max-examples" not in run.flower:
        server["max-examples"] = _most_examples(run, files)
    if operator_token:
        server["operator-token"] = operator_token
    federation = FederationConfig.from_flower(server)  # fail here, before any party starts
    for k in range(len(files)):
        PartyConfig.from_flower({}, {"partition-id": k}, party)
    make_client = make_secure_client_app if federation.secure else make_client_app
    quiet_simulation()
    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(server),
        client_app=make_client(party),
        num_supernodes=len(files),
        backend_config={
            "client_resources": {"num_cpus": run.party_cpus, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": "ERROR"},
        },
    )
    return _results(run, federation, files, url, time.perf_counter() - start)


def _most_examples(run: LocalFederation, files: list[Path]) -> int:
    """The most examples a party draws in a round of `local-epochs` passes (`steps_for`'s steps)."""
    epochs, batch = (
        float(run.flower["local-epochs"]),
        int(run.flower.get("batch-size", PartyConfig.batch_size)),
    )
    return max(math.ceil(epochs * len(load_jsonl(f)) / batch) * batch for f in files)


def _results(
    run: LocalFederation, federation: FederationConfig, files: list[Path], url: str, wall_s: float
) -> dict[str, Any]:
    out = Path(run.out_dir)
    log = out / ROUNDS_FILE
    rounds = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if len(rounds) < federation.num_rounds:
        raise ConfigError(
            f"the federation stopped after {len(rounds)} of {federation.num_rounds} rounds; "
            "see the Flower log above (too few parties connected, or every party failed)"
        )
    last = rounds[-1] if rounds else {}
    results = {
        "parties": [{"file": str(f), "examples": len(load_jsonl(f))} for f in files],
        "server": {"url": url, "started": run.server_url is None},
        "secure": federation.secure,
        "num_rounds": federation.num_rounds,
        "wall_s": round(wall_s, 2),
        "bytes_sent": last.get("bytes_sent", 0),
        "bytes_received": last.get("bytes_received", 0),
        "final": {k: v for k, v in last.items() if k.startswith("eval-")},
        "rounds": rounds,
        "prefix": str(out / "prefix"),
    }
    write_json(out / RESULTS_FILE, results)
    return results
