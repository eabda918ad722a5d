"""The federation's server as a Flower ServerApp: the parties' prefixes aggregated by `strategy`
(FedAvg weighted by examples, or a Flower server optimiser on top of it; `strategies.py`).

After every round the joint prefix is saved (`out_dir/prefix`, with `state.json` naming the round),
evaluated on the operator's held-out data when given, and its metrics appended to
`out_dir/rounds.jsonl`. Rerunning with the same `out_dir` resumes after the last saved round.

The run config is shared with the parties, which refuse the keys that are theirs alone
(`PARTY_ONLY_KEYS`); the operator's own connection therefore has keys of its own, prefixed
`operator-` (`operator-server-url`, ...). Each party's reported `num-examples` is checked against
a bound (`max_examples`), and a report out of range is refused and logged with the round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from splitprefix.data.formats import Example, load_jsonl
from splitprefix.data_party.generate import split_scorer
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import SplitSession, open_split
from splitprefix.data_party.split_train import SplitTrainConfig, initial_prefix
from splitprefix.data_party.train import TrainConfig
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.federation.client_app import KV_KEY
from splitprefix.federation.config import FederationConfig, FlowerConfig
from splitprefix.federation.secure import run_secure_rounds
from splitprefix.federation.strategies import make_strategy
from splitprefix.federation.traffic import CountingGrid
from splitprefix.model.prefix import Prefix

logger = logging.getLogger(__name__)

"""The operator's own connection, under `operator-` in the run config (`operator-server-url`)."""
PREFIX_DIR = "prefix"
STATE_FILE = "state.json"
ROUNDS_FILE = "rounds.jsonl"


class _RoundKeeper:
    """Flower's `evaluate_fn`: saves, evaluates and logs the joint prefix after each round."""

    def __init__(
        self,
        session: SplitSession,
        config: FederationConfig,
        grid: CountingGrid,
        done: int,
        template: Prefix,
    ) -> None:
        self.session, self.config, self.grid = session, config, grid
        self.done, self.template, self.out = done, template, Path(config.out_dir)
        self.last_round: Callable[[], dict[str, Any]] = dict
        """What the strategy recorded of the round just aggregated (parties, failures)."""
        self.held_out: list[Example] = load_jsonl(Path(config.eval_data)) if config.eval_data else []
        self.start = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        kv = torch.from_numpy(arrays[KV_KEY].numpy().copy())  # (L, 2, n_kv, P, head_dim)
        metrics = self.evaluate(kv)
        if server_round == 0:  # the starting prefix: already saved, or given
            logger.info("joint prefix before round %d: %s", self.done + 1, metrics)
            return MetricRecord(metrics) if metrics else None
        global_round = self.done + server_round
        Prefix(self.template.config, kv).save(self.out / PREFIX_DIR)
        (self.out / STATE_FILE).write_text(json.dumps({"round": global_round}) + "\n")
        line = {"round": global_round, "wall_s": round(time.perf_counter() - self.start, 2)}
        line |= self.last_round() | self.grid.snapshot() | metrics
        with (self.out / ROUNDS_FILE).open("a") as f:
            f.write(json.dumps(line) + "\n")
        logger.info("round %d: %s", global_round, line)
        return MetricRecord(metrics) if metrics else None

    def evaluate(self, kv: torch.Tensor) -> dict[str, int | float | list[int] | list[float]]:
        if not self.held_out:
            return {}
        c, s = self.config, self.session
        report = evaluate(
            split_scorer(s),
            s.tokenizer,
            self.held_out,
            kv,
            EvalConfig(max_length=c.max_length, exact_match=c.exact_match),
        )
        return {f"eval-{k}": float(v) for k, v in report.items() if isinstance(v, int | float)}


def resume_or_init(session: SplitSession, config: FederationConfig) -> tuple[int, Prefix]:
    """(rounds already done, joint prefix): the saved ones in `out_dir`, else round 0 and a new prefix."""
    out = Path(config.out_dir)
    if (out / STATE_FILE).is_file() and (out / PREFIX_DIR).is_dir():
        prefix = Prefix.load(out / PREFIX_DIR)
        session.check_prefix(prefix, f"the saved joint prefix in {out}")
        return int(json.loads((out / STATE_FILE).read_text())["round"]), prefix
    init = Path(config.init) if config.init else None
    split_config = SplitTrainConfig(
        prefix_len=None if init else config.prefix_len, init=init, train=TrainConfig(seed=config.seed)
    )
    return 0, initial_prefix(session, split_config)


def run_federation(grid: Grid, config: FederationConfig) -> dict[str, Any]:
    """Run the remaining rounds of the federation on `grid`; returns the rounds' metrics and the output paths.

    Each line of `rounds.jsonl` counts the bytes the server exchanged with the parties so far
    (this process's share of the run: a resumed run starts counting again).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    session = open_split(
        config.emulator_dir, ClientSettings(config.server_url, token=config.token, head=config.head)
    )
    try:
        done, prefix = resume_or_init(session, config)
        if done == 0:
            (out / ROUNDS_FILE).unlink(missing_ok=True)  # a fresh run: drop an older run's log
            saved = {k: v for k, v in asdict(config).items() if k != "token"}  # no secret on disk
            (out / "federation_config.json").write_text(json.dumps(saved, indent=2) + "\n")
        remaining = config.num_rounds - done
        counting = CountingGrid(grid)
        keeper = _RoundKeeper(session, config, counting, done, prefix)
        if remaining > 0 and config.secure:
            run_secure_rounds(counting, config, prefix().detach(), remaining, keeper, rounds_before=done)
        elif remaining > 0:
            strategy = make_strategy(config, rounds_before=done)
            keeper.last_round = lambda: strategy.last_round
            strategy.start(
                grid=counting,
                initial_arrays=ArrayRecord({KV_KEY: prefix().detach()}),
                num_rounds=remaining,
                timeout=config.round_timeout_s,
                train_config=ConfigRecord(),
                evaluate_fn=keeper,
            )
    finally:
        session.close()
    log = out / ROUNDS_FILE
    rounds = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return {"rounds": rounds, "prefix": str(out / PREFIX_DIR)}


def make_server_app(defaults: FlowerConfig | None = None) -> ServerApp:
    """A ServerApp whose settings are `defaults`, overridden by the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, FederationConfig.from_flower({**(defaults or {}), **context.run_config}))

    return app


app = make_server_app()
"""The ServerApp Flower loads (`splitprefix.federation.server_app:app`)."""
