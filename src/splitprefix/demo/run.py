"""`run_demo`: the whole system on the shipped model, stage by stage, then the report.

The model party's server runs as a child process on a free loopback port with random tokens, and is
stopped when the run ends, whether it finished, failed or was interrupted. The data parties' files,
the emulator and the prefixes live in a temporary folder; only the report is written to `out_dir`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from splitprefix.data_party.generate import SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.demo import measure, training
from splitprefix.demo.config import DemoConfig
from splitprefix.demo.report import write_report
from splitprefix.demo.stages import StageClock
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix
from splitprefix.model_party.child import serve_in_child
from splitprefix.model_party.compress import emulate

STAGES = 8


class Trained(NamedTuple):
    """What the training stages hand to the measurements."""

    task: training.Task
    """The parties' data and the held-out split."""
    prefixes: dict[str, torch.Tensor]
    """Full-layout prefix kv by name: offsite (party 0), single_split, federated, central."""
    offsite_all: list[torch.Tensor]
    """Every party's integrated offsite prefix."""


SCORED = ("base", "offsite", "single_split", "federated", "central")
"""The prefixes compared on the held-out split, in the order of the report's bars."""


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage and write the report; returns the content of `results.json`."""
    start = time.perf_counter()
    clock = StageClock(STAGES, echo)
    with (
        clock.catching_interrupts(),
        tempfile.TemporaryDirectory(prefix="splitprefix-demo-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        results: dict[str, Any] = {"config": {**vars(config)}}
        with clock.stage(
            "model party",
            f"emulator of '{config.model}' (K={config.split_at}, {config.keep} upper layers kept); server",
            "check that the model loads (`splitprefix info builtin`) and that a loopback port can be opened",
        ):
            emulate(config.model, config.split_at, config.keep, work / "emulator")
            names = ["party-0", "federation", "generation"]
            child = stack.enter_context(serve_in_child(config.model, config.split_at, work / "server", names))
            echo(f"    model-party server at {child.url} (a child process on loopback)")
            results["server_url"] = child.url
            results["emulator_bytes"] = sum(
                f.stat().st_size for f in (work / "emulator").rglob("*") if f.is_file()
            )
        try:
            trained = _train(config, work, clock, child.url, child.tokens, results)
            _measure(config, work, clock, child.url, child.tokens["generation"], trained, results)
        except BaseException:
            _keep_server_log(work / "server" / "server.log", Path(config.out_dir), echo)
            raise
        stack.close()  # the server stops before the report is written
        with clock.stage(
            "report", f"writing the report to {config.out_dir}", "check that the folder is writable"
        ):
            results["wall_s"] = {**clock.wall_s, "total": round(time.perf_counter() - start, 1)}
            write_report(Path(config.out_dir), results)
    echo(_headline(results))
    echo(f"report: {Path(config.out_dir) / 'report.md'} ({results['wall_s']['total']:.0f} s in all)")
    return results


def _train(
    config: DemoConfig,
    work: Path,
    clock: StageClock,
    url: str,
    tokens: dict[str, str],
    results: dict[str, Any],
) -> Trained:
    """The four training stages; fills `results` with the parties, loss curves and wire bytes."""
    emulator = work / "emulator"
    with clock.stage(
        "offsite",
        f"{config.parties} data parties train {config.offsite_steps} steps each on the emulator, then integrate",
        "lower --parties, or rerun with --quick to check the setup",
    ):
        task = training.make_parties(config, work)
        offsite = [
            training.offsite_party(config, emulator, file, work / f"offsite-{k}")
            for k, file in enumerate(task.files)
        ]
        results["parties"] = [
            {"examples": len(s), "intents": sorted({str(e.label) for e in s})} for s in task.shards
        ]
    with clock.stage(
        "split training",
        f"party 0 refines its prefix through the server ({config.single_steps} steps, head=client)",
        "the server may have stopped: see the lines above; rerun the demo",
    ):
        settings = ClientSettings(url, token=tokens["party-0"], head="client")
        single = training.split_party(config, emulator, settings, offsite[0].kv, task.shards[0])
    with clock.stage(
        "federation",
        f"{config.rounds} rounds x {config.local_steps} steps per party on Flower, from the integrated prefixes' average",
        "see Flower's log above; a round needs every party, so check that none ran out of memory",
    ):
        init = training.average_prefix(
            [o.kv for o in offsite], [len(s) for s in task.shards], work / "fed-init"
        )
        fed = training.federate(config, emulator, url, tokens["federation"], task, init, work / "federation")
        fed_kv = Prefix.load(work / "federation" / "prefix")().detach()
    with clock.stage(
        "central reference",
        f"whole-model prefix tuning on the union ({config.central_steps} steps, no split)",
        "this stage runs locally only; rerun with --quick to check the setup",
    ):
        full, tokenizer = load_causal_lm(config.model), load_tokenizer(config.model)
        ref = training.central(config, full, tokenizer, task.train)
    results["curves"] = _curves(offsite, single, fed, ref)
    results["wire"] = _wire_rows(config, results["emulator_bytes"], single.traffic, fed)
    prefixes = {"offsite": offsite[0].kv, "single_split": single.kv, "federated": fed_kv, "central": ref.kv}
    return Trained(task, prefixes, [o.kv for o in offsite])


def _curves(
    offsite: list[training.Trained], single: training.Trained, fed: dict[str, Any], ref: training.Trained
) -> dict[str, Any]:
    """Loss per step of each training stage; per round (parties' mean, held-out) for the federation."""
    return {
        "offsite": [o.losses for o in offsite],
        "single_split": single.losses,
        "federation": [
            {"round": r["round"], "train_loss": r.get("train-loss"), "eval_loss": r.get("eval-loss")}
            for r in fed["rounds"]
        ],
        "central": ref.losses,
    }


def _wire_rows(
    config: DemoConfig, emulator_bytes: int, single: dict[str, Any], fed: dict[str, Any]
) -> list[dict[str, Any]]:
    """Bytes on the wire per stage; the federation's split traffic is estimated from party 0's rate."""
    per_token = (single["bytes_sent"] + single["bytes_received"]) / max(single["tokens"], 1)
    mean_tokens = single["tokens"] / (config.single_steps * config.batch_size)
    fed_tokens = round(config.central_steps * config.batch_size * mean_tokens)
    return [
        {
            "stage": f"emulator, shipped once to each of the {config.parties} parties",
            "bytes": emulator_bytes * config.parties,
            "tokens": None,
            "measured": True,
        },
        {"stage": "offsite training", "bytes": 0, "tokens": None, "measured": True},
        {
            "stage": "split training (party 0)",
            "bytes": single["bytes_sent"] + single["bytes_received"],
            "bytes_sent": single["bytes_sent"],
            "bytes_received": single["bytes_received"],
            "tokens": single["tokens"],
            "measured": True,
        },
        {
            "stage": "federation: prefixes to and from the Flower server",
            "bytes": fed["bytes_sent"] + fed["bytes_received"],
            "tokens": None,
            "measured": True,
        },
        {
            "stage": "federation: split traffic of the parties (estimate)",
            "bytes": round(per_token * fed_tokens),
            "tokens": fed_tokens,
            "measured": False,
        },
        {"stage": "central reference", "bytes": 0, "tokens": None, "measured": True},
    ]


def _measure(
    config: DemoConfig,
    work: Path,
    clock: StageClock,
    url: str,
    token: str,
    trained: Trained,
    results: dict[str, Any],
) -> None:
    """Evaluation and generation; fills `results` with the scores, the samples and tokens/s."""
    task, prefixes, offsite_all = trained
    with clock.stage(
        "evaluation",
        f"held-out loss and exact match of {len(SCORED)} prefixes on {len(task.test)} unseen examples",
        "this stage runs locally only; rerun with --quick to check the setup",
    ):
        full, tokenizer = load_causal_lm(config.model), load_tokenizer(config.model)
        scores: dict[str, Any] = {"base": measure.score(full, tokenizer, task.test, None)}
        scores |= {name: measure.score(full, tokenizer, task.test, kv) for name, kv in prefixes.items()}
        scores["offsite_each_party"] = [measure.score(full, tokenizer, task.test, kv) for kv in offsite_all]
        results["scores"] = scores
    with clock.stage(
        "generation",
        f"split generation of all {len(task.test)} held-out answers with the federated prefix; tokens/s",
        "the server may have stopped: see the lines above; rerun the demo",
    ):
        settings = ClientSettings(url, token=token, head="client")
        with SplitModel.open(work / "emulator", settings) as split:
            split.kv = prefixes["federated"]
            results["generation"] = measure.generate_samples(split, task.test)
            split.kv = split.split.empty_kv()
            prompts = [e.prompt for e in task.test[: config.generation_prompts]]
            results["speed"] = measure.tokens_per_second(
                split, full, prompts, config.speed_new_tokens, config.speed_reps
            )


def _keep_server_log(log: Path, out: Path, echo: Callable[[str], None]) -> None:
    """Copy the server's log out of the temporary folder, which is about to go, for the post-mortem."""
    if log.is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, out / "server.log")
        echo(f"the model-party server's log is in {out / 'server.log'}")


def _headline(results: dict[str, Any]) -> str:
    """One line: held-out loss and exact match of each scored prefix."""
    s = results["scores"]
    return "held-out loss / exact match: " + ", ".join(
        f"{name} {s[name]['loss']:.2f} / {s[name]['exact_match']:.2f}" for name in SCORED
    )
