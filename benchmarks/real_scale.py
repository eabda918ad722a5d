"""Real scale: memory, bytes on the wire and time on a realistic-shape model with random weights.

Builds, in a temporary directory, a Llama-shaped model (24 layers, hidden 1024, 16 heads and 4
key/value heads, vocab 32,000, untied head; random weights, stored in bf16) with the shipped
tokenizer. Random weights measure memory, bytes and time, not quality. Then, each as its own
process as the parties would run them: `emulate` (K = 2, N = 2), `serve`, and `train` in both head
modes. Prints JSON: peak RSS of each process against its goal, bytes per real token each way
against the tensors the protocol must carry, the split step against the whole model's, and the
held-out evaluation of 64 examples against 16 training steps.

    python benchmarks/real_scale.py                   # about 10 minutes on 2 CPU cores
    python benchmarks/real_scale.py --device cuda     # both parties on the GPU, in bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import benchmark_server, print_run
from transformers import AutoModelForCausalLM, LlamaConfig

from splitprefix.data.batching import encode_examples, resolve_pad_id
from splitprefix.data.formats import Example
from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.train import StepHooks, TrainConfig, local_loss_fn, train_prefix
from splitprefix.model.builtin import builtin_dir
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.pretraining.corpus import python_topic_documents

GiB = 1 << 30
KV_HEADS = 4
SLACK = GiB // 2
"""The goals' allowance beyond the bytes a process runs: the interpreter, torch and transformers
alone take about 0.4 GB of it."""


def build_model(args: argparse.Namespace, directory: Path) -> LlamaConfig:
    """The model with random weights, saved in bf16 with the shipped tokenizer."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=KV_HEADS,
        intermediate_size=args.intermediate,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    load_tokenizer(builtin_dir()).save_pretrained(directory)
    del model
    return config


def write_data(directory: Path, args: argparse.Namespace) -> tuple[Path, Path, list[Example]]:
    """Training text of exactly `max_length` tokens per example (so every position is real) and 64
    held-out prompt/completion examples of the synthetic task, for loss and exact match."""
    tokenizer = load_tokenizer(directory)
    train = []
    for text in python_topic_documents():
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= args.max_length:
            train.append(Example("", str(tokenizer.decode(ids[: args.max_length]))))
    held_out = make_task(SyntheticTaskConfig(n_train=10, n_test=args.eval_examples, seed=0))[1]
    train_file, test_file = directory / "train.jsonl", directory / "test.jsonl"
    train_file.write_text("".join(json.dumps({"text": e.completion}) + "\n" for e in train))
    test_file.write_text(
        "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in held_out)
    )
    return train_file, test_file, train


def timed(command: list[str], log: Path) -> tuple[float, int]:
    """Run `command` under /usr/bin/time; (wall seconds, peak RSS in bytes)."""
    began = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kb=%M", *command], stderr=out, stdout=out)
    wall = time.perf_counter() - began
    text = log.read_text()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); its log ends:\n{text[-3000:]}")
    return wall, int(re.findall(r"peak_rss_kb=(\d+)", text)[-1]) * 1024


def peak_rss(pid: int) -> int:
    """Peak resident memory (VmHWM) of a running process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def parameter_bytes(args: argparse.Namespace, layers: int, head: bool, itemsize: int) -> int:
    """Bytes of the embeddings, `layers` decoder layers and (with `head`) the final norm and head."""
    d, f, kv = args.hidden, args.intermediate, KV_HEADS * (args.hidden // 16)
    layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    embed = args.vocab * d
    return itemsize * (embed + layers * layer + (embed + d if head else 0))


def emulate_run(full: Path, emu: Path, work: Path, args: argparse.Namespace) -> dict:
    wall, rss = timed(
        [*CLI, "emulate", str(full), "--split-at", "2", "--keep", str(args.keep), "--out", str(emu)],
        work / "emulate.log",
    )
    emulator = parameter_bytes(args, 2 + args.keep, True, 2)  # bf16, as stored
    layer = parameter_bytes(args, 1, False, 4) - args.vocab * args.hidden * 4
    goal = emulator + layer + SLACK
    return {"wall_s": round(wall, 1), "peak_rss_mb": mb(rss), "goal_mb": mb(goal), "goal_met": rss <= goal}


def train_run(
    head: str, emu: Path, url: str, token: str, files: tuple[Path, Path], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"prefix-{head}"
    command = [*CLI, "train", str(emu), "--server", url, "--token", token, "--head", head]
    command += ["--data", str(files[0]), "--eval-data", str(files[1]), "--out", str(out)]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", "0"]
    command += ["--max-length", str(args.max_length), "--prefix-len", str(args.prefix_len)]
    command += ["--device", args.device, "--dtype", args.dtype]
    wall, rss = timed(command, work / f"train-{head}.log")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "eval.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss": rss, "steps": lines[1:], "held_out": report["held_out"]}


def _pooled(before: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, Any]:
    """Runs of one head mode together: the steps of all, the highest peak, every evaluation."""
    run = run | {"held_outs": [run["held_out"]]}
    if before is None:
        return run
    peak = max(before["peak_rss"], run["peak_rss"])
    return run | {
        "steps": before["steps"] + run["steps"],
        "peak_rss": peak,
        "held_outs": before["held_outs"] + run["held_outs"],
    }


def wire_summary(run: dict[str, Any], head: str, args: argparse.Namespace) -> dict:
    """Bytes per real token each way, against the tensors the protocol must carry (fp32 wire)."""
    tokens = args.batch_size * args.max_length  # every position of every example is real
    hidden = 4 * args.hidden  # one hidden state or its gradient, per token
    prefix = 4 * (args.layers - 2) * 2 * KV_HEADS * (args.hidden // 16) * args.prefix_len
    states = 2 if head == "client" else 1  # head=client: forward output and backward gradient each way
    ideal = {
        "sent": states * hidden + prefix / tokens + (8 if head == "server" else 0),  # + int64 targets
        "received": states * hidden + prefix / tokens,
    }
    out = {}
    for direction in ("sent", "received"):
        measured = statistics.median(s[f"bytes_{direction}"] for s in run["steps"]) / tokens
        out[direction] = {
            "bytes_per_real_token": round(measured, 1),
            "ideal": round(ideal[direction], 1),
            "ratio": round(measured / ideal[direction], 4),
            "goal_met": measured <= 1.1 * ideal[direction],
        }
    return out


def whole_step_s(full: Path, train: list[Example], args: argparse.Namespace, work: Path) -> float:
    """Median step time of the same prefix training on the whole model, in this process."""
    model = load_causal_lm(
        full, torch.bfloat16 if args.dtype == "bf16" else torch.float32, device=args.device
    )
    tokenizer = load_tokenizer(full)
    prefix = Prefix(PrefixConfig.for_model(model.config, args.prefix_len))
    config = TrainConfig(steps=min(args.steps, 8), batch_size=args.batch_size, checkpoint_every=0)
    log = work / "whole.jsonl"
    encoded = encode_examples(tokenizer, train, args.max_length)
    train_prefix(
        prefix,
        local_loss_fn(model),
        encoded,
        resolve_pad_id(tokenizer),
        config,
        hooks=StepHooks(metrics_log=log),
    )
    steps = [json.loads(line)["step_s"] for line in log.read_text().splitlines()][1:]
    return statistics.median(steps)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    full, emu = work / "full", work / "emulator"
    config = build_model(args, full)
    train_file, test_file, train = write_data(full, args)
    report: dict[str, Any] = {
        "model": {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "vocab_size")}
        | {"parameters_m": round(parameter_bytes(args, args.layers, True, 1) / 1e6, 1)},
        "setup": vars(args) | {"split_at": 2, "wire_dtype": "fp32"},
        "emulate": emulate_run(full, emu, work, args),
    }
    server_args = ("--device", args.device, "--max-graph-bytes", str(args.server_graph_mb << 20))
    runs: dict[str, dict[str, Any]] = {}
    with benchmark_server(str(full), 2, work, server_args) as (url, token, pid):
        # the modes alternate, so that a change in the machine's load falls on both
        for rep in range(args.repeats):
            for head in ("client", "server"):
                one = train_run(head, emu, url, token, (train_file, test_file), work / f"{head}-{rep}", args)
                runs[head] = _pooled(runs.get(head), one)
        server_rss = peak_rss(pid)
    top = parameter_bytes(args, args.layers - 2, True, 2) - args.vocab * args.hidden * 2
    budgets = (args.server_graph_mb << 20) + (1024 << 20)  # held graphs + generation sessions (default)
    report["server"] = {
        "peak_rss_mb": mb(server_rss),
        "weights_mb": mb(top),
        "goal_mb": mb(top + budgets + SLACK),
        "goal_met": server_rss <= top + budgets + SLACK,
    }
    report["data_party"] = {head: data_party(runs[head], head, args) for head in runs}
    report["wire"] = {head: wire_summary(runs[head], head, args) for head in runs}
    step = {head: statistics.median(s["step_s"] for s in runs[head]["steps"]) for head in runs}
    whole = whole_step_s(full, train, args, work)
    report["step_s"] = {
        "head_client": round(step["client"], 3),
        "head_server": round(step["server"], 3),
        "whole_model": round(whole, 3),
        "server_over_client": round(step["server"] / step["client"], 3),
        "split_over_whole": {head: round(step[head] / whole, 3) for head in step},
        "goal_met": step["server"] <= step["client"],
    }
    report["held_out_eval"] = {head: held_out_summary(runs[head], step[head], args) for head in runs}
    return report


def held_out_summary(run: dict[str, Any], step_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """The final held-out evaluation (loss, then exact match by split generation) of each run."""
    walls = [h["wall_s"] for h in run["held_outs"]]
    return {
        "examples": args.eval_examples,
        "wall_s": walls,
        "sixteen_steps_s": round(16 * step_s, 2),
        "goal_met": statistics.mean(walls) <= 16 * step_s,
        "loss": round(run["held_out"]["loss"], 4),
        "exact_match": run["held_out"].get("exact_match"),
    }


def data_party(run: dict[str, Any], head: str, args: argparse.Namespace) -> dict:
    """Peak RSS against what the data party runs: embeddings, K layers, the head at head=client,
    the fp32 prefix with its gradient and two AdamW moments, and the step's activations."""
    itemsize = 2 if args.dtype != "fp32" else 4
    weights = parameter_bytes(args, 2, head == "client", itemsize)
    prefix = 4 * 4 * args.layers * 2 * KV_HEADS * (args.hidden // 16) * args.prefix_len
    tokens = args.batch_size * args.max_length
    # saved activations of K layers (about 20 floats of d per token each), plus fp32 logits,
    # their softmax and gradient at head=client
    activations = tokens * (2 * 20 * args.hidden * itemsize + (12 * args.vocab if head == "client" else 0))
    goal = weights + prefix + activations + SLACK
    return {
        "peak_rss_mb": mb(run["peak_rss"]),
        "runs_mb": mb(weights + prefix + activations),
        "goal_mb": mb(goal),
        "goal_met": run["peak_rss"] <= goal,
    }


def mb(n: float) -> float:
    return round(n / 1e6, 1)


CLI = [sys.executable, "-m", "splitprefix.cli.main"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--keep", type=int, default=2, help="N: upper layers the emulator keeps.")
    parser.add_argument("--steps", type=int, default=12, help="Split-training steps per run.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per head mode, alternating.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--server-graph-mb", type=int, default=512, help="The server's held-graph budget.")
    parser.add_argument("--device", default="cpu", help="Device of both parties: cpu or cuda.")
    parser.add_argument(
        "--dtype", default="bf16", help="The data party's dtype (the server: the checkpoint's)."
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print_run(run, parser.parse_args())
