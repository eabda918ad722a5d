"""Federation on real text: does the joint prefix of N data parties beat each party alone, and come
close to one prefix trained centrally on the union? Each server strategy and party optimiser is a
row against FedAvg by example count (the reference). Prints JSON.

The successor of `federation.py` (the synthetic task, through the split and Flower's simulation
engine) for the many runs a comparison of strategies takes. Here everything runs in this process:
- the parties train through the whole model with the loss of `local_loss_fn`, which the split
  with head=client equals (tests/data_party/test_split_train.py);
- the server is the ServerApp's own strategy (`federation.strategies.make_strategy`, Flower's
  classes), driven by Flower's own `Strategy.start` over a Grid that hands each message to a
  party in this process;
- a party's round is `PartyConfig.train_config` (the ClientApp's settings: local optimiser, lr
  schedule, seed + round), trained by `train_prefix`, as `client_app.train_round` does.

Corpora: `real_text.corpus` (manual pages, GNU info manuals), held out by document. Cuts: 'iid'
(a seeded shuffle in N equal parts) and 'label' (sorted by label, then N contiguous parts: the
manual pages by alphabetical range of their names, the info paragraphs by ranges of manuals).
Budgets, with R rounds of S local steps of B examples per party:
- alone: each party R x S steps of B on its own part (the same sequential steps as federated);
- alone_examples: each party R x S x N steps of B (as many examples as the whole federation);
- central: R x S steps of N x B on the union (the same sequential steps and examples);
- central_examples: R x S x N steps of B on the union (as many examples, N times the steps).
A variant with other rounds keeps R x S (and so the sequential steps and examples) fixed.
Every prefix starts from the same seeded prefix and is scored on the held-out split (token loss).
The share of the central gain is (no-prefix loss - loss) / (no-prefix loss - central loss).

    nice -n 10 python benchmarks/federation_real.py --corpus man --cut label --seeds 0 \\
        --variants fedavg fedavg-run > man-label-0.json
    python benchmarks/federation_real.py --merge man-label-0.json man-label-1.json > merged.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from real_text import corpus

from splitprefix.data.batching import EncodedExample, encode_examples, resolve_pad_id
from splitprefix.data.formats import Example
from splitprefix.data_party.train import (
    TrainConfig,
    load_moments,
    local_loss_fn,
    make_optimizer,
    optimizer_moments,
    train_prefix,
)
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.federation.client_app import KV_KEY, NUM_EXAMPLES, SERVER_ROUND
from splitprefix.federation.config import FederationConfig, PartyConfig
from splitprefix.federation.strategies import make_strategy
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig


@dataclasses.dataclass(frozen=True)
class Variant:
    """One federated row: the server's strategy and the parties' local training."""

    strategy: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_tau: float = 1e-3
    optimizer: str = "adamw"
    lr: float | None = None
    """The parties' peak lr; None = --lr."""
    lr_schedule: str = "round"
    keep_state: bool = False
    """The party's AdamW moments carry over from round to round (keep_optimizer_state)."""
    rounds: int | None = None
    """Rounds; None = --rounds. Local steps follow, so that rounds x local steps stays fixed."""


VARIANTS = {
    "fedavg": Variant(),
    "fedavg-run": Variant(lr_schedule="run"),
    "fedavg-run-state": Variant(lr_schedule="run", keep_state=True),
    "fedavg-state": Variant(keep_state=True),
    "fedavg-r25": Variant(rounds=25),
    "fedavg-r10": Variant(rounds=10),
    "fedavg-run-r10": Variant(lr_schedule="run", rounds=10),
    "fedavg-run-r25": Variant(lr_schedule="run", rounds=25),
    "fedavgm-lr2": Variant("fedavgm", server_lr=2.0),
    "fedavgm-lr1-m5": Variant("fedavgm", server_lr=1.0, server_momentum=0.5),
    "fedavgm-run-lr2": Variant("fedavgm", server_lr=2.0, lr_schedule="run"),
    "fedadam-0.3": Variant("fedadam", server_lr=0.3),
    "fedadam-0.1": Variant("fedadam", server_lr=0.1),
    "fedadam-1": Variant("fedadam", server_lr=1.0),
    "fedyogi-0.3": Variant("fedyogi", server_lr=0.3),
    "fedadagrad-0.3": Variant("fedadagrad", server_lr=0.3),
    "fedadam-sgd30-0.3": Variant("fedadam", server_lr=0.3, optimizer="sgd", lr=30.0),
    "fedadam-sgd30-r50-0.1": Variant("fedadam", server_lr=0.1, optimizer="sgd", lr=30.0, rounds=50),
    "fedavg-sgd30": Variant(optimizer="sgd", lr=30.0),
}


class LocalGrid(Grid):
    """A Grid whose nodes are functions in this process: each message goes to `parties[node_id]`."""

    def __init__(self, parties: dict[int, Callable[[Message], RecordDict]]) -> None:
        self.parties = parties
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.parties)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid only sends and receives")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid only sends and receives")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as a SuperLink stamps it
            content = self.parties[message.metadata.dst_node_id](message)
            replies.append(Message(content, reply_to=message))
        return replies


class Setting:
    """One corpus, cut and seed: the parties' data, the held-out set and the shared starting prefix."""

    def __init__(self, args: argparse.Namespace, corpus_name: str, cut: str, seed: int) -> None:
        self.args, self.corpus, self.cut, self.seed = args, corpus_name, cut, seed
        train, test = corpus(corpus_name, args.cache)
        self.model, self.tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
        self.model.requires_grad_(False)
        self.pad_id = resolve_pad_id(self.tokenizer)
        self.parts = cut_parts(train, args.parties, cut, seed)
        self.encoded = [encode_examples(self.tokenizer, p, args.max_length) for p in self.parts]
        self.union = [e for part in self.encoded for e in part]
        self.test = test[: args.n_test] if args.n_test else test
        torch.manual_seed(seed)
        self.start = Prefix(PrefixConfig.for_model(self.model.config, args.prefix_len))().detach().clone()
        self.loss_fn = local_loss_fn(self.model)

    def score(self, kv: torch.Tensor) -> float:
        report = evaluate(
            self.model,
            self.tokenizer,
            self.test,
            kv,
            EvalConfig(max_length=self.args.max_length, exact_match=False),
        )
        return round(float(report["loss"]), 4)

    def train(
        self,
        data: list[EncodedExample],
        config: TrainConfig,
        kv: torch.Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        prefix: Prefix | None = None,
    ) -> torch.Tensor:
        prefix = prefix or Prefix(
            PrefixConfig.for_model(self.model.config, self.args.prefix_len),
            kv if kv is not None else self.start,
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.args.bf16):
            train_prefix(prefix, self.loss_fn, data, self.pad_id, config, desc="", optimizer=optimizer)
        return prefix().detach().clone()

    def solo(self, data: list[EncodedExample], steps: int, batch_size: int) -> torch.Tensor:
        a = self.args
        return self.train(
            data,
            TrainConfig(
                steps=steps,
                batch_size=batch_size,
                lr=a.lr,
                warmup_steps=0,
                seed=self.seed,
                checkpoint_every=0,
            ),
        )


def cut_parts(train: list[Example], n: int, cut: str, seed: int) -> list[list[Example]]:
    """N equal parts: a seeded shuffle ('iid'), or contiguous ranges of the label-sorted list ('label')."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    if cut == "label":
        order.sort(key=lambda i: str(train[i].label))  # stable: shuffled within a label
    size = len(order) // n
    return [[train[i] for i in order[k * size : (k + 1) * size]] for k in range(n)]


def federate(setting: Setting, variant: Variant) -> tuple[torch.Tensor, list[float]]:
    """The joint prefix after the federation, and the held-out loss after each round."""
    a = setting.args
    rounds = variant.rounds or a.rounds
    local_steps = a.rounds * a.local_steps // rounds
    if rounds * local_steps != a.rounds * a.local_steps:
        raise SystemExit(f"{rounds} rounds do not divide {a.rounds} x {a.local_steps} steps")
    party = PartyConfig(
        "emulator",
        "http://unused",
        "unused",
        local_steps=local_steps,
        batch_size=a.batch_size,
        lr=variant.lr or a.lr,
        optimizer=variant.optimizer,  # type: ignore[arg-type]
        lr_schedule=variant.lr_schedule,
        keep_optimizer_state=variant.keep_state,
        num_rounds=rounds,
        seed=setting.seed,  # type: ignore[arg-type]
    )
    federation = FederationConfig(
        "emulator",
        "http://unused",
        "unused",
        num_rounds=rounds,
        min_parties=a.parties,
        local_steps=local_steps,
        batch_size=a.batch_size,
        strategy=variant.strategy,  # type: ignore[arg-type]
        server_lr=variant.server_lr,
        server_momentum=variant.server_momentum,
        server_tau=variant.server_tau,
    )
    kept: dict[int, dict[str, torch.Tensor]] = {}
    """Each party's optimiser moments between rounds, as the ClientApp keeps them in its Context."""

    def party_fn(node: int) -> Callable[[Message], RecordDict]:
        def train(message: Message) -> RecordDict:
            kv = torch.from_numpy(next(iter(message.content.array_records.values()))[KV_KEY].numpy().copy())
            server_round = int(message.content.config_records["config"][SERVER_ROUND])
            config = party.train_config(server_round, len(setting.encoded[node]))
            prefix = Prefix(PrefixConfig.for_model(setting.model.config, a.prefix_len), kv)
            optimizer = make_optimizer(prefix, config)
            if node in kept:
                load_moments(optimizer, kept[node])
            out = setting.train(setting.encoded[node], config, optimizer=optimizer, prefix=prefix)
            if party.keep_optimizer_state:
                kept[node] = optimizer_moments(optimizer)
            return RecordDict(
                {
                    "arrays": ArrayRecord({KV_KEY: out}),
                    "metrics": MetricRecord({NUM_EXAMPLES: config.steps * config.batch_size}),
                }
            )

        return train

    grid = LocalGrid({k: party_fn(k) for k in range(a.parties)})
    losses: list[float] = []
    strategy = make_strategy(federation)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({KV_KEY: setting.start.clone()}),
        num_rounds=rounds,
        train_config=ConfigRecord(),
        evaluate_fn=lambda r, arrays: (
            losses.append(setting.score(torch.from_numpy(arrays[KV_KEY].numpy().copy())))
            if a.every_round and r > 0
            else None
        ),
    )
    return torch.from_numpy(result.arrays[KV_KEY].numpy().copy()), losses


def run_setting(args: argparse.Namespace, corpus_name: str, cut: str, seed: int) -> dict[str, Any]:
    s = Setting(args, corpus_name, cut, seed)
    steps, n, b = args.rounds * args.local_steps, args.parties, args.batch_size
    loss: dict[str, Any] = {}
    wall: dict[str, float] = {}
    t = time.perf_counter()
    rows = set(args.baseline_rows) if args.baselines else set()
    if "no_prefix" in rows:
        loss["no_prefix"] = s.score(s.start[:, :, :, :0])
    for k, part in enumerate(s.encoded):
        if f"alone{k}" in rows or "alone" in rows:
            loss.setdefault("alone", [None] * n)[k] = s.score(s.solo(part, steps, b))
            _log_row(corpus_name, cut, seed, f"alone{k}", loss["alone"][k])
    if "central" in rows:
        loss["central"] = s.score(s.solo(s.union, steps, n * b))
    wall["baselines"] = round(time.perf_counter() - t, 1)
    if args.equal_examples:
        t = time.perf_counter()
        loss["central_examples"] = s.score(s.solo(s.union, steps * n, b))
        wall["central_examples"] = round(time.perf_counter() - t, 1)
    if args.alone_examples:
        t = time.perf_counter()
        loss["alone_examples"] = [s.score(s.solo(part, steps * n, b)) for part in s.encoded]
        wall["alone_examples"] = round(time.perf_counter() - t, 1)
    _log_row(corpus_name, cut, seed, "loss", loss)
    federated: dict[str, Any] = {}
    for name in args.variants:
        t = time.perf_counter()
        kv, per_round = federate(s, VARIANTS[name])
        federated[name] = {
            "loss": s.score(kv),
            "per_round": per_round,
            "wall_s": round(time.perf_counter() - t, 1),
        }
        _log_row(corpus_name, cut, seed, name, federated[name])
    report = {
        "corpus": corpus_name,
        "cut": cut,
        "seed": seed,
        "party_sizes": [len(p) for p in s.parts],
        "party_labels": [sorted({str(e.label) for e in p}) for p in s.parts],
        "test": len(s.test),
        "loss": loss,
        "federated": federated,
        "wall_s": wall,
    }
    return report


def _log_row(corpus_name: str, cut: str, seed: int, row: str, value: Any) -> None:
    """Each row as it is measured, on stderr: a run stopped early still tells what it measured."""
    print(
        "ROW",
        json.dumps({"corpus": corpus_name, "cut": cut, "seed": seed, "row": row, "value": value}),
        file=sys.stderr,
        flush=True,
    )


def union(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report per (corpus, cut, seed): the rows of runs that split a setting's work, joined,
    with each federated row's share of the central gain."""
    joined: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in reports:
        key = (r["corpus"], r["cut"], r["seed"])
        if key not in joined:
            joined[key] = {
                **r,
                "loss": dict(r["loss"]),
                "federated": dict(r["federated"]),
                "wall_s": dict(r["wall_s"]),
            }
            continue
        into = joined[key]
        n = len(into["party_sizes"])
        mine, theirs = into["loss"].get("alone", [None] * n), r["loss"].get("alone", [None] * n)
        alone = [a if a is not None else b for a, b in zip(mine, theirs, strict=True)]
        for field in ("loss", "federated", "wall_s"):
            into[field] |= r[field]
        if any(a is not None for a in alone):
            into["loss"]["alone"] = alone
    out = list(joined.values())
    for r in out:
        r["gain_share"] = gain_shares(r)
    return out


def gain_shares(report: dict[str, Any]) -> dict[str, Any]:
    """Each row's share of the central gain, and whether each federated row beats every party alone."""
    loss = report["loss"]
    base, central = loss["no_prefix"], loss["central"]

    def share(x: float) -> float:
        return round((base - x) / (base - central), 4)

    out: dict[str, Any] = {"alone": [share(x) for x in loss["alone"]]}
    for key in ("central_examples",):
        if key in loss:
            out[key] = share(loss[key])
    if "alone_examples" in loss:
        out["alone_examples"] = [share(x) for x in loss["alone_examples"]]
    for name, row in report["federated"].items():
        out[name] = {"share": share(row["loss"]), "beats_every_alone": row["loss"] < min(loss["alone"])}
    return out


def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (corpus, cut): mean and spread over seeds of each row's loss and share, and the goals."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        groups.setdefault(f"{r['corpus']}/{r['cut']}", []).append(r)
    out: dict[str, Any] = {}
    for key, rs in groups.items():
        rows: dict[str, Any] = {}
        for name in ("no_prefix", "central", "central_examples"):
            if all(name in r["loss"] for r in rs):
                rows[name] = _stats([r["loss"][name] for r in rs])
        rows["best_alone"] = _stats([min(r["loss"]["alone"]) for r in rs])
        rows["alone_share"] = _stats([max(r["gain_share"]["alone"]) for r in rs])
        names = set.intersection(*(set(r["federated"]) for r in rs))
        for name in sorted(names):
            shares = [r["gain_share"][name]["share"] for r in rs]
            rows[name] = {
                "loss": _stats([r["federated"][name]["loss"] for r in rs]),
                "share": _stats(shares),
                "beats_every_alone_in_every_seed": all(
                    r["gain_share"][name]["beats_every_alone"] for r in rs
                ),
                "share_at_least_0.95_in_mean": statistics.mean(shares) >= 0.95,
            }
        out[key] = {"seeds": [r["seed"] for r in rs], "rows": rows}
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(xs), 4),
        "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
        "min": round(min(xs), 4),
        "max": round(max(xs), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--cache", type=Path, default=Path(".cache/real_text"))
    parser.add_argument("--corpus", nargs="+", default=["man", "info"])
    parser.add_argument("--cut", nargs="+", default=["iid", "label"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=0, help="Held-out examples scored; 0 = all.")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Train under bf16 autocast (scores stay fp32).",
    )
    parser.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Score no prefix, each party alone and central (off: another run of the "
        "same settings does; --merge joins them).",
    )
    parser.add_argument(
        "--baseline-rows",
        nargs="+",
        default=["no_prefix", "alone", "central"],
        help="Which baselines this run scores (alone0, alone1, ... for single parties).",
    )
    parser.add_argument("--equal-examples", action="store_true", help="Also central at equal examples.")
    parser.add_argument(
        "--alone-examples", action="store_true", help="And each party alone at equal examples."
    )
    parser.add_argument(
        "--every-round", action="store_true", help="Score the joint prefix after every round."
    )
    parser.add_argument("--variants", nargs="*", default=["fedavg"], choices=sorted(VARIANTS))
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON")
    args = parser.parse_args()
    if args.merge:
        reports = union([r for path in args.merge for r in json.loads(path.read_text())["per_setting"]])
        print(json.dumps({"summary": summarize(reports), "per_setting": reports}, indent=2))
        return
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | {"OMP_WAIT_POLICY": "PASSIVE"})
    for attr in ("_task_id", "_run_id", "_node_id"):  # Flower stamps messages with the process's
        setattr(TaskIdentity, attr, 1)  # identity, as its SuperLink sets it: be node 1 of run 1
    reports = [
        run_setting(args, c, cut, seed) for c in args.corpus for cut in args.cut for seed in args.seeds
    ]
    if args.baselines and set(args.baseline_rows) >= {"no_prefix", "alone", "central"}:
        reports = union(reports)
    settings = {k: v for k, v in vars(args).items() if k not in ("merge", "cache")}
    summary = summarize(reports) if "gain_share" in reports[0] else {}
    print(json.dumps({"settings": settings, "summary": summary, "per_setting": reports}, indent=2))


if __name__ == "__main__":
    main()
