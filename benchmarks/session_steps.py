"""The server's generation step against the length of the sessions' caches, on a realistic shape.

Builds the model of `real_scale.py` (24 layers, hidden 1024, 4 key/value heads, vocab 32,000,
random weights in bf16), loads the server's layers (K = 2) in this process and opens sessions
with a prompt of `--keys` tokens. Then it times `merged.run_steps`, the forward that every
generation step runs on the server: one session alone, and `--rows` sessions merged into one
forward, at each cache length. Runs alternate between the lengths against drift. Prints JSON:
the median milliseconds per step, and what a step costs per cached key beyond the shortest cache.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/session_steps.py
    python benchmarks/session_steps.py --device cuda --keys 64 2048 8192 --rows 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from harness import print_run
from real_scale import build_model

from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.merged import StepWork, prefill, run_steps
from splitprefix.model_party.session_cache import SessionCache
from splitprefix.model_party.sessions import Session
from splitprefix.model_party.settings import ServerSettings


def open_session(backend: TopBackend, keys: int, room: int) -> Session:
    """A session of one row whose cache holds `keys` tokens, with room for `room` more."""
    d, first = backend.dims, backend.settings.split_at
    layers = d.num_layers - first
    cache = SessionCache(d, first, layers, (1, keys + room), backend.dtype, backend.settings.device)
    session = Session("benchmark", "server", 1, cache, cache.mask, keys + room, 0)
    device = backend.settings.device
    hidden = torch.randn(1, keys, d.hidden_size, dtype=backend.dtype, device=device)
    mask, positions = torch.ones(1, keys, dtype=torch.long), torch.arange(keys)[None]
    no_prefix = torch.zeros(layers, 2, d.num_kv_heads, 0, d.head_dim, dtype=backend.dtype, device=device)
    prefill(backend, session, no_prefix, StepWork(session, hidden, mask, positions))
    return session


def step_seconds(backend: TopBackend, sessions: list[Session]) -> float:
    """One generation step of every session, merged into one forward."""
    device = backend.settings.device
    works = [
        StepWork(
            s,
            torch.randn(1, 1, backend.dims.hidden_size, dtype=backend.dtype, device=device),
            torch.ones(1, 1, dtype=torch.long),
            s.next_positions,
        )
        for s in sessions
    ]
    _sync(device)
    start = time.perf_counter()
    run_steps(backend, works)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model_dir = work / "model"
    build_model(args, model_dir)
    backend = TopBackend(
        ServerSettings(
            str(model_dir), args.split_at, max_tokens=max(args.keys) + args.reps + 8, device=args.device
        )
    )
    lengths = sorted(args.keys)
    setups = [(rows, keys) for rows in (1, args.rows) for keys in lengths]
    # sessions of slightly different lengths, as merged sessions would be
    sessions = {
        setup: [open_session(backend, setup[1] + i, args.reps + 2) for i in range(setup[0])]
        for setup in setups
    }
    times: dict[tuple[int, int], list[float]] = {setup: [] for setup in setups}
    for setup in setups:
        step_seconds(backend, sessions[setup])  # warm-up
    for _ in range(args.reps):
        for setup in setups:
            times[setup].append(step_seconds(backend, sessions[setup]))
    runs = []
    for (rows, keys), seconds in times.items():
        runs.append(
            {"rows": rows, "cached_keys": keys, "median_ms": round(1000 * statistics.median(seconds), 2)}
        )
    slope = {}
    for rows in (1, args.rows):
        short, long = (
            next(r for r in runs if r["rows"] == rows and r["cached_keys"] == k)
            for k in (lengths[0], lengths[-1])
        )
        slope[f"rows_{rows}_us_per_cached_key"] = round(
            1000 * (long["median_ms"] - short["median_ms"]) / (lengths[-1] - lengths[0]), 3
        )
    d = backend.dims
    return {
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "kv_heads": d.num_kv_heads,
        },
        "split_at": args.split_at,
        "device": args.device,
        "dtype": str(backend.dtype),
        "torch_threads": args.threads,
        "cache_bytes_per_key_per_row": (d.num_layers - args.split_at)
        * 2
        * d.num_kv_heads
        * d.head_dim
        * backend.dtype.itemsize,
        "reps": args.reps,
        "runs": runs,
        "step_cost_per_cached_key": slope,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--split-at", type=int, default=2)
    parser.add_argument("--keys", type=int, nargs="+", default=[64, 2048], help="Cached keys per session.")
    parser.add_argument("--rows", type=int, default=4, help="Sessions merged into one forward.")
    parser.add_argument("--reps", type=int, default=10, help="Timed steps per setup.")
    parser.add_argument("--threads", type=int, default=2, help="torch's intra-op threads.")
    parser.add_argument("--device", default="cpu", help="Where the server's layers run: cpu, cuda, ...")
    print_run(run, parser.parse_args())


if __name__ == "__main__":
    main()
