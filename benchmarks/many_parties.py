"""Many data parties on one model server: aggregate tokens/s, each party's share, step latency.

One `splitprefix serve` and N data parties (N = 1, 2, 4, 8), each party a separate process with its
own token, as separate vendors' clients would be. Three mixes:

- `generating`: every party generates greedily, batch 1, over the session's WebSocket;
- `training`: every party runs head=server training steps (forward, loss, backward) of one batch;
- `mixed`: party 0 trains, the others generate (N >= 2).

Every party loads, warms up, then waits; all start together and run for `--seconds`. Tokens are
generated tokens (generating) or real tokens of the trained batch (training); a step is one token
(generating) or one training step. Prints JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/many_parties.py --seconds 8
    OMP_WAIT_POLICY=PASSIVE python benchmarks/many_parties.py --model realistic --seconds 30 \
        --train-batch 1 --train-length 32

`--model realistic` builds the shape of `real_scale.py` here (24 layers, hidden 1024, 4 key/value
heads, vocab 32,000, random weights in bf16), where the layers' arithmetic, not their Python,
sets a forward's time.

The server runs with `--serve-args` (default `--threads 1`: the parties share its cores).

- `aggregate_tokens_per_s`, per mix and role; `speedup` against the same mix with one party;
- `share`: each party's tokens/s over the mean of its role (1.0 = a fair share);
- `p50_ms`, `p95_ms`: step latency over every step of the role's parties;
- `party_cpu_ms_per_token`: the role's parties' CPU (all their threads) over their tokens;
  `server_cpu_s`: the server process's CPU during the timed run (Linux's /proc);
- `cpu_idle_share`, `cpu_steal_share`: of the machine's CPU time during the timed run, the share no
  process used, and the share the hypervisor gave to other machines (/proc/stat);
- `cpu_bound_tokens_per_s` (one role only): the tokens/s the run's CPU per token (its parties' and the
  server's together) would give with every core busy all the time; `generating_8_cpu_bound_speedup`
  sets that of 8 generating parties against one party's measured tokens/s, a ceiling for the goal;
- `mixed_p95_vs_generating`: the generating parties' p95 in `mixed` over their p95 in `generating`
  with the same N.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import print_run

from splitprefix.model_party.child import ChildServer, serve_in_child

PROMPTS = ["happiness: the state of", "a tool used for cutting wood", "river: a large natural stream of"]
MIXES = ("generating", "training", "mixed")


def _generating_party(args: argparse.Namespace, settings: Any, emulator: Path) -> dict[str, Any]:
    from splitprefix.data_party.generate import GenerationConfig, SplitModel

    config = GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    with SplitModel.open(emulator, settings) as model:
        ids, mask = model.encode([PROMPTS[args.index % len(PROMPTS)]])
        for _ in model.iter_tokens(ids, mask, GenerationConfig(max_new_tokens=4, stop_at_eos=False)):
            pass  # warm-up
        _wait_for_go()
        steps: list[float] = []
        cpu, tokens, deadline = time.process_time(), 0, time.perf_counter() + args.seconds
        while time.perf_counter() < deadline:
            last = None
            for _ in model.iter_tokens(ids, mask, config):
                now = time.perf_counter()
                if now >= deadline:
                    break
                tokens += 1
                if last is not None:  # the first token's time is the prefill's
                    steps.append(now - last)
                last = now
    return {"role": "generating", "tokens": tokens, "steps_s": steps, "cpu_s": time.process_time() - cpu}


def _training_party(args: argparse.Namespace, settings: Any, emulator: Path) -> dict[str, Any]:
    from splitprefix.data.batching import collate, encode_examples, resolve_pad_id
    from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
    from splitprefix.data_party.session import open_split

    session = open_split(emulator, settings)
    examples, _ = make_task(SyntheticTaskConfig(n_train=args.train_batch, n_test=0, seed=args.index))
    batch = collate(
        encode_examples(session.tokenizer, examples, args.train_length), resolve_pad_id(session.tokenizer)
    )
    shape = session.prefix_config(16).kv_shape
    kv = torch.zeros(shape).normal_(0, 0.02).requires_grad_(True)
    loss_fn = session.loss_fn()

    def step() -> None:
        kv.grad = None
        loss, n = loss_fn(batch, kv)
        (loss / n).backward()

    step()  # warm-up
    _wait_for_go()
    steps: list[float] = []
    cpu, tokens, deadline = time.process_time(), 0, time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        step()
        end = time.perf_counter()
        if end >= deadline:
            break
        steps.append(end - start)
        tokens += int(batch.attention_mask.sum())
    cpu = time.process_time() - cpu
    session.close()
    return {"role": "training", "tokens": tokens, "steps_s": steps, "cpu_s": cpu}


def _wait_for_go() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


def party_main(args: argparse.Namespace) -> None:
    """One data party: load, warm up, say ready, run on 'go' for `seconds`, print its JSON."""
    from splitprefix.data_party.remote import ClientSettings

    torch.set_num_threads(1)  # the parties share the server's cores
    logging.disable(logging.WARNING)  # each party would repeat the head mode's disclosure
    settings = ClientSettings(args.url, token=args.token, head="server", max_retries=50, backoff_max_s=1.0)
    run = _generating_party if args.party == "generating" else _training_party
    print(json.dumps(run(args, settings, Path(args.emulator))), flush=True)


def _roles(mix: str, n: int) -> list[str]:
    if mix == "mixed":
        return ["training"] + ["generating"] * (n - 1)
    return [mix] * n


def _machine_cpu() -> list[int]:
    """The machine's CPU time so far, in ticks: user, nice, system, idle, iowait, irq, softirq, steal."""
    return [int(n) for n in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def _cpu_shares(before: list[int], after: list[int]) -> dict[str, float]:
    ticks = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(ticks) or 1
    return {
        "cpu_idle_share": round((ticks[3] + ticks[4]) / total, 3),
        "cpu_steal_share": round(ticks[7] / total, 3),
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_parties(
    args: argparse.Namespace, server: ChildServer, emulator: Path, roles: list[str]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Start one process per role, start them together; their results, and the server's CPU seconds
    and the machine's idle and stolen shares during the run."""
    url, tokens = server.url, server.tokens
    procs = []
    for i, role in enumerate(roles):
        command = [sys.executable, __file__, "--party", role, "--index", str(i), "--url", url]
        command += [f"--token={tokens[f'p{i}']}", "--emulator", str(emulator), "--seconds", str(args.seconds)]
        command += ["--new-tokens", str(args.new_tokens), "--train-batch", str(args.train_batch)]
        command += ["--train-length", str(args.train_length)]
        procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a party failed to start: {line!r}")
    server_cpu, machine = _cpu_s(server.pid), _machine_cpu()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    time.sleep(args.seconds)
    cpu = {"server_cpu_s": round(_cpu_s(server.pid) - server_cpu, 2)} | _cpu_shares(machine, _machine_cpu())
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.seconds + 120)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results, cpu


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarise(results: list[dict[str, Any]], seconds: float, cpu: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = dict(cpu)
    for role in ("generating", "training"):
        mine = [r for r in results if r["role"] == role]
        if not mine:
            continue
        tokens = [r["tokens"] for r in mine]
        rates = [t / seconds for t in tokens]
        mean = statistics.mean(rates)
        steps = [s for r in mine for s in r["steps_s"]]
        out[role] = {
            "parties": len(mine),
            "aggregate_tokens_per_s": round(sum(rates), 1),
            "tokens_per_s": [round(r, 1) for r in rates],
            "share": [round(r / mean, 3) if mean else 0.0 for r in rates],
            "p50_ms": round(1000 * _percentile(steps, 0.5), 2),
            "p95_ms": round(1000 * _percentile(steps, 0.95), 2),
            "steps": len(steps),
            "party_cpu_ms_per_token": round(1000 * sum(r["cpu_s"] for r in mine) / max(1, sum(tokens)), 3),
        }
        if len(mine) == len(results):  # every core-second of the run went to this role
            cpu_s = sum(r["cpu_s"] for r in mine) + cpu["server_cpu_s"]
            out[role]["cpu_bound_tokens_per_s"] = round((os.cpu_count() or 1) * sum(tokens) / cpu_s, 1)
    return out


def _goals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, from the rows of each (mix, N)."""
    one_gen, one_train = rows["generating/1"]["generating"], rows["training/1"]["training"]
    goals: dict[str, Any] = {}
    if "generating/8" in rows:
        g8 = rows["generating/8"]["generating"]
        goals["generating_8_speedup"] = round(
            g8["aggregate_tokens_per_s"] / one_gen["aggregate_tokens_per_s"], 3
        )
        goals["generating_8_share_range"] = [min(g8["share"]), max(g8["share"])]
        goals["generating_8_p95_vs_lone"] = round(g8["p95_ms"] / one_gen["p95_ms"], 3)
        goals["generating_8_cpu_bound_speedup"] = round(
            g8["cpu_bound_tokens_per_s"] / one_gen["aggregate_tokens_per_s"], 3
        )
    if "training/8" in rows:
        t8 = rows["training/8"]["training"]
        goals["training_8_speedup"] = round(
            t8["aggregate_tokens_per_s"] / one_train["aggregate_tokens_per_s"], 3
        )
        goals["training_8_share_range"] = [min(t8["share"]), max(t8["share"])]
    for key, row in rows.items():
        mix, n = key.split("/")
        if mix == "mixed" and f"generating/{n}" in rows:
            base = rows[f"generating/{n}"]["generating"]["p95_ms"]
            goals[f"mixed_{n}_p95_vs_generating"] = round(row["generating"]["p95_ms"] / base, 3)
    return goals


def training_merge_probe(args: argparse.Namespace, reps: int = 5) -> dict[str, Any]:
    """Would merging two parties' training requests pay? Seconds of the server's forward and backward
    for two requests of `train_batch` rows, run one after the other, against one of twice the rows."""
    from splitprefix.model_party.backend import TopBackend
    from splitprefix.model_party.settings import ServerSettings
    from splitprefix.model_party.validation import ForwardInputs

    backend = TopBackend(ServerSettings(args.model, args.split_at))
    d, length = backend.dims, args.train_length

    def inputs(rows: int) -> ForwardInputs:
        kv = torch.randn(d.num_layers - args.split_at, 2, d.num_kv_heads, 16, d.head_dim)
        mask = torch.ones(rows, 16 + length, dtype=torch.long)
        positions = torch.arange(16, 16 + length).repeat(rows, 1)
        return ForwardInputs(torch.randn(rows, length, d.hidden_size), mask, positions, kv)

    def seconds(batches: list[ForwardInputs]) -> float:
        start = time.perf_counter()
        for x in batches:
            out, leaves = backend._run(x, requires_grad=True)
            torch.autograd.grad(out.float().square().mean(), leaves)
        return time.perf_counter() - start

    apart, merged = [inputs(args.train_batch), inputs(args.train_batch)], [inputs(2 * args.train_batch)]
    seconds(apart + merged)  # warm-up
    times: dict[str, list[float]] = {"apart": [], "merged": []}
    for _ in range(reps):  # interleaved against drift
        times["apart"].append(seconds(apart))
        times["merged"].append(seconds(merged))
    apart_s, merged_s = statistics.median(times["apart"]), statistics.median(times["merged"])
    return {
        "rows_each": args.train_batch,
        "positions": length,
        "two_requests_s": round(apart_s, 4),
        "one_merged_request_s": round(merged_s, 4),
        "saved": round(1 - merged_s / apart_s, 3),
        "torch_threads": torch.get_num_threads(),
    }


REALISTIC = argparse.Namespace(layers=24, hidden=1024, intermediate=2816, vocab=32_000)
"""The shape `--model realistic` builds (`real_scale.build_model`)."""


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from splitprefix.model.loading import describe_model
    from splitprefix.model_party.compress import emulate

    load_before = os.getloadavg()
    name = args.model
    if name == "realistic":  # the server, the parties and the probe load it from here
        from real_scale import build_model  # its imports cost the built-in runs nothing

        build_model(REALISTIC, work / "model")
        args.model = str(work / "model")
    emulator = work / "emulator"
    emulate(args.model, args.split_at, 1, emulator)
    counts = [int(n) for n in args.parties.split(",")]
    names = [f"p{i}" for i in range(max(counts))]
    rows: dict[str, dict[str, Any]] = {}
    serve_args = tuple(args.serve_args.split())
    with serve_in_child(args.model, args.split_at, work / "server", names, extra_args=serve_args) as child:
        for mix in args.mixes.split(","):
            for n in counts:
                if mix == "mixed" and n < 2:
                    continue
                results, cpu = run_parties(args, child, emulator, _roles(mix, n))
                rows[f"{mix}/{n}"] = summarise(results, args.seconds, cpu)
                print(f"{mix}/{n}: {json.dumps(rows[f'{mix}/{n}'])}", file=sys.stderr, flush=True)
    return {
        "model": name,
        "model_info": describe_model(args.model),
        "split_at": args.split_at,
        "serve_args": args.serve_args,
        "seconds_per_run": args.seconds,
        "generation": {"batch": 1, "head": "server", "new_tokens_per_session": args.new_tokens},
        "training": {"batch": args.train_batch, "max_length": args.train_length, "prefix_len": 16},
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "training_merge_probe": training_merge_probe(args),
        "goals": _goals(rows) if "generating/1" in rows and "training/1" in rows else {},
        "runs": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="builtin", help="'builtin', 'realistic' (built here), or a full model directory."
    )
    parser.add_argument("--split-at", type=int, default=2)
    parser.add_argument("--parties", default="1,2,4,8", help="Party counts, comma-separated.")
    parser.add_argument("--mixes", default=",".join(MIXES), help="Mixes, comma-separated.")
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each timed run.")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens per generation session.")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-length", type=int, default=64)
    parser.add_argument(
        "--serve-args", default="--threads 1", help="Options of `splitprefix serve`, space-separated."
    )
    # the party processes' own arguments
    parser.add_argument("--party", choices=["generating", "training"], help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--emulator", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.party:
        party_main(args)
    else:
        print_run(run, args)


if __name__ == "__main__":
    main()
