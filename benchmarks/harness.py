"""What the benchmarks share: the model party's server as a child process, and the JSON entry point."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from splitprefix.model_party.child import serve_in_child


@contextlib.contextmanager
def benchmark_server(
    model: str, split_at: int, work: Path, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[str, str, int]]:
    """`splitprefix serve MODEL --split-at K [extra_args]` in a child process; yields (url, token,
    pid), always stops it."""
    with serve_in_child(model, split_at, work / "server", ["benchmark"], extra_args=extra_args) as child:
        yield child.url, child.tokens["benchmark"], child.pid


def print_run(run: Callable[[argparse.Namespace, Path], dict[str, Any]], args: argparse.Namespace) -> None:
    """Print `run(args, work)` as JSON, with `work` a temporary folder and OpenMP threads that sleep.

    Idle OpenMP threads must sleep, not spin: the parties and the server take turns on the same
    cores. Without OMP_WAIT_POLICY=PASSIVE the script re-executes itself with it.
    """
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | {"OMP_WAIT_POLICY": "PASSIVE"})
    with tempfile.TemporaryDirectory() as work:
        print(json.dumps(run(args, Path(work)), indent=2))
