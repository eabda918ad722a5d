"""The demo's training stages, each a thin layer over the library: offsite, split, federation, central.

Every stage returns what the report needs: the prefix (as kv), its loss curve, and its traffic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.data.batching import Batch, encode_examples, resolve_pad_id
from splitprefix.data.formats import Example, write_jsonl
from splitprefix.data.partition import dirichlet_partition
from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.offsite import OffsiteConfig, integrate, train_offsite
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import LossFn, TrainConfig, fit_prefix, train_prefix
from splitprefix.demo.config import DemoConfig
from splitprefix.federation.local import LocalFederation, run_local_federation
from splitprefix.model.prefix import Prefix, PrefixConfig


@dataclass
class Task:
    """The synthetic task as the demo's parties hold it."""

    train: list[Example]
    """The union of the parties' data (the centralized reference's training set)."""
    test: list[Example]
    """Held-out examples: unseen compositions and slot fillers."""
    shards: list[list[Example]]
    """Each party's label-skewed share of `train`."""
    files: list[Path]
    """Each party's JSONL file."""
    test_file: Path
    """The held-out JSONL file (the federation operator's evaluation set)."""


@dataclass
class Trained:
    """A trained prefix with its loss curve and what its training sent over the network."""

    kv: torch.Tensor
    """The full model's prefix (L, 2, n_kv, P, head_dim)."""
    losses: list[float]
    """Mean token loss of each optimiser step."""
    traffic: dict[str, Any] = field(default_factory=dict)
    """Bytes sent and received, and the real tokens they carried (empty when nothing crossed)."""


def make_parties(config: DemoConfig, work: Path) -> Task:
    """The synthetic task, cut among the parties by Dirichlet label skew, written as JSONL files."""
    task = SyntheticTaskConfig(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    train, test = make_task(task)
    parts = dirichlet_partition([str(e.label) for e in train], config.parties, config.alpha, config.seed)
    shards = [[train[i] for i in part] for part in parts]
    files = [work / "data" / f"party-{k}.jsonl" for k in range(config.parties)]
    for path, shard in zip(files, shards, strict=True):
        write_jsonl(path, shard)
    test_file = work / "data" / "test.jsonl"
    write_jsonl(test_file, test)
    return Task(train, test, shards, files, test_file)


def _train_config(config: DemoConfig, steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_steps=0,
        seed=config.seed,
        checkpoint_every=0,
    )


def offsite_party(config: DemoConfig, emulator: Path, data: Path, out: Path) -> Trained:
    """Train one party's prefix on the emulator (no network), then integrate it into the full layout."""
    offsite = OffsiteConfig(
        prefix_len=config.prefix_len,
        eval_fraction=0.0,
        train=_train_config(config, config.offsite_steps),
    )
    torch.manual_seed(config.seed)  # the same starting prefix for every party
    train_offsite(emulator, data, out / "emulator-layout", offsite)
    full = integrate(out / "emulator-layout", emulator, out / "full-layout")
    return Trained(full().detach(), _read_losses(out / "emulator-layout"))


def _read_losses(directory: Path) -> list[float]:
    return [float(x) for x in json.loads((directory / "train_losses.json").read_text())]


def average_prefix(prefixes: list[torch.Tensor], weights: list[int], out: Path) -> Path:
    """Save the example-weighted average of full-layout prefixes to `out` (the federation's start)."""
    total = sum(weights)
    kv = sum(w / total * p for w, p in zip(weights, prefixes, strict=True))
    assert isinstance(kv, torch.Tensor)
    layers, _, n_kv, p, hd = kv.shape
    Prefix(PrefixConfig(layers, n_kv, hd, p), kv).save(out)
    return out


def _counting_tokens(loss_fn: LossFn, seen: list[int]) -> LossFn:
    def counted(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        seen[0] += int(batch.attention_mask.sum())  # real tokens whose hidden states cross the wire
        return loss_fn(batch, kv)

    return counted


def split_party(
    config: DemoConfig, emulator: Path, settings: ClientSettings, init: torch.Tensor, data: list[Example]
) -> Trained:
    """Refine `init` through the model party's server on one party's data (head=client)."""
    session = open_split(emulator, settings)
    try:
        prefix = Prefix(session.prefix_config(init.shape[3]), init.clone())
        encoded = encode_examples(session.tokenizer, data, 128)
        seen = [0]
        loss_fn = _counting_tokens(session.loss_fn(), seen)
        train = _train_config(config, config.single_steps)
        pad_id = resolve_pad_id(session.tokenizer)
        history = train_prefix(prefix, loss_fn, encoded, pad_id, train, desc="split (party 0)")
        traffic = session.client.traffic.snapshot()
    finally:
        session.close()
    wire = {
        "bytes_sent": traffic["bytes_sent"],
        "bytes_received": traffic["bytes_received"],
        "tokens": seen[0],
    }
    return Trained(prefix().detach(), history.losses, wire)


def federate(
    config: DemoConfig, emulator: Path, url: str, token: str, task: Task, init: Path, out: Path
) -> dict[str, Any]:
    """The federation of every party on Flower's simulation engine, from the `init` prefix."""
    flower: dict[str, bool | float | int | str] = {
        "num-rounds": config.rounds,
        "local-steps": config.local_steps,
        "batch-size": config.batch_size,
        "lr": config.lr,
        "head": "client",
        "seed": config.seed,
        "init": str(init),
        "eval-data": str(task.test_file),
    }
    run = LocalFederation(
        str(emulator),
        tuple(map(str, task.files)),
        str(out),
        server_url=url,
        token=token,
        party_cpus=float(os.cpu_count() or 1),  # one party at a time: they share the cores
        flower=flower,
    )
    return run_local_federation(run)


def central(
    config: DemoConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: list[Example]
) -> Trained:
    """The reference: prefix tuning of the whole model on the union of the parties' data, from scratch."""
    torch.manual_seed(config.seed)
    prefix_config = PrefixConfig.for_model(model.config, config.prefix_len)
    train_config = _train_config(config, config.central_steps)
    prefix, history = fit_prefix(model, tokenizer, train, prefix_config, train_config, desc="central")
    return Trained(prefix().detach(), history.losses)
