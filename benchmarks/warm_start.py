"""Warm start: split training from the integrated offsite prefix against split training from a cold
prefix. Counts the networked steps each needs to reach the held-out loss of a reference prefix
trained directly on the full model for the same number of steps. Prints JSON.

The model party's server runs as a separate process on loopback; head=client, fp32 wire.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/warm_start.py --model builtin --split-at 2 --keep 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from harness import benchmark_server, print_run

from splitprefix.data.formats import write_jsonl
from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.split_train import SplitTrainConfig, train_split
from splitprefix.data_party.train import TrainConfig, fit_prefix
from splitprefix.evaluation.evaluate import EvalConfig, evaluate_loss
from splitprefix.model.emulator import EmulatorManifest, integrate_kv
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.model_party.compress import emulate


def split_curve(
    emulator: Path,
    settings: ClientSettings,
    data: Path,
    held_out: Path,
    out: Path,
    init: Path | None,
    train: TrainConfig,
):
    """Held-out loss after every `eval_every` split-training steps, read from the metrics log."""
    train_split(
        emulator,
        settings,
        data,
        out,
        SplitTrainConfig(prefix_len=16, init=init, eval_data=held_out, train=train),
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], round(line["eval_loss"], 4)) for line in lines if "eval_loss" in line]


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step at the target loss; the tolerance covers the curve's 4-decimal rounding."""
    return next((step for step, loss in curve if loss <= target + 1e-4), None)


def task(args: argparse.Namespace):
    """(train, held-out) of the synthetic task, or of a real-text corpus (`real_text.py`)."""
    if args.corpus == "synthetic":
        train, test = make_task(SyntheticTaskConfig(n_train=2000, n_test=300, seed=args.seed))
    else:
        from real_text import corpus

        train, test = corpus(args.corpus, args.cache)
    return train, test[: args.eval_examples]


def warm_prefix(args: argparse.Namespace, work: Path, train, train_config: TrainConfig) -> Path:
    """The integrated offsite prefix: `--init` when given, else trained here on a layer-drop emulator."""
    if args.init is not None:
        return args.init
    emulator = load_causal_lm(args.emulator or work / "emu")
    torch.manual_seed(args.seed)
    config = PrefixConfig.for_model(emulator.config, 16)
    offsite, _ = fit_prefix(emulator, load_tokenizer(args.model), train, config, train_config, desc="offsite")
    manifest = EmulatorManifest.load(args.emulator or work / "emu")
    warm_kv = integrate_kv(offsite().detach(), manifest, args.dropped)
    Prefix(PrefixConfig.for_model(load_causal_lm(args.model).config, 16), warm_kv).save(work / "warm")
    return work / "warm"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    full, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    train, held = task(args)
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "held.jsonl", held)
    train_config = TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed, eval_every=args.eval_every)
    eval_config = EvalConfig(exact_match=False)

    target = args.target_loss
    if target is None:
        torch.manual_seed(args.seed)
        reference, _ = fit_prefix(
            full, tokenizer, train, PrefixConfig.for_model(full.config, 16), train_config, desc="reference"
        )
        target = evaluate_loss(full, tokenizer, held, reference().detach(), eval_config)["loss"]

    if args.emulator is None:
        emulate(args.model, args.split_at, args.keep, work / "emu")
    phases = {"warm": ["warm"], "cold": ["cold"], "both": ["warm", "cold"]}[args.phase]
    inits = {"warm": warm_prefix(args, work, train, train_config) if "warm" in phases else None, "cold": None}
    steps = {"warm": args.warm_steps or args.steps, "cold": args.steps}
    curves = {}
    with benchmark_server(args.model, args.split_at, work) as (url, token, _):
        for name in phases:
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            lr = args.warm_lr if name == "warm" and args.warm_lr is not None else args.lr
            config = TrainConfig(**{**asdict(train_config), "steps": steps[name], "lr": lr})
            curves[name] = {
                "curve": split_curve(
                    args.emulator or work / "emu",
                    ClientSettings(url, token=token, head="client"),
                    work / "train.jsonl",
                    work / "held.jsonl",
                    work / name / "run",
                    inits[name],
                    config,
                )
            }
            curves[name]["wall_s"] = round(time.perf_counter() - start, 1)
            curves[name]["steps_to_reference_loss"] = first_reaching(curves[name]["curve"], target)
    return {
        "benchmark": "warm_start",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "reference_heldout_loss": round(target, 4),
        **curves,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--split-at", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", choices=["synthetic", "man", "info"], default="synthetic")
    parser.add_argument("--cache", type=Path, default=Path(".cache/real_text"))
    parser.add_argument("--phase", choices=["both", "warm", "cold"], default="both")
    parser.add_argument("--emulator", type=Path, default=None, help="A built emulator (default: layer drop).")
    parser.add_argument("--init", type=Path, default=None, help="Integrated prefix to warm-start from.")
    parser.add_argument(
        "--warm-steps", type=int, default=None, help="Steps of the warm run (default --steps)."
    )
    parser.add_argument(
        "--dropped", choices=["auto", "stand-in", "zeros"], default="auto", help="Dropped layers' prefix."
    )
    parser.add_argument("--warm-lr", type=float, default=None, help="lr of the warm run (default --lr).")
    parser.add_argument(
        "--target-loss", type=float, default=None, help="The reference's held-out loss, if known."
    )
    print_run(run, parser.parse_args())


if __name__ == "__main__":
    main()
