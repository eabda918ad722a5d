"""The same apps on Flower's deployment engine: a SuperLink and one SuperNode per data party, each a
separate process on localhost (insecure), and `flwr run` submitting the Flower App in deploy/flower.

The slowest test of the suite (about a minute): every run starts Flower's SuperExec, ServerApp and
ClientApp processes, each of which imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from live_server import free_port
from split_helpers import EXAMPLES, write_jsonl
from splitprefix.model.prefix import Prefix
from splitprefix.model_party.child import child_process

APP_DIR = Path(__file__).resolve().parents[2] / "deploy" / "flower"
BIN = Path(sys.executable).parent
"""Flower's executables sit next to the interpreter; SuperLink and SuperNode start others by name."""


def flower_env(home: Path) -> dict[str, str]:
    """This interpreter's environment, with Flower's state in `home` and its executables on PATH."""
    home.mkdir(parents=True)
    return os.environ | {"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="Flower's executables are not installed")
def test_superlink_and_two_supernodes_run_a_round(dirs, server, tmp_path):
    # Prepare: a SuperLink and two SuperNodes, each party's own settings in its node config
    files = [write_jsonl(tmp_path / f"party{i}.jsonl", EXAMPLES[: 2 + 2 * i]) for i in range(2)]
    env, link = flower_env(tmp_path / "flwr"), free_port()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    out = tmp_path / "federation"
    run_config = (
        f'operator-emulator-dir="{dirs.emulator}" operator-server-url="{server.url}" out-dir="{out}" '
    )
    run_config += "num-rounds=1 min-parties=2 local-steps=2 batch-size=2 prefix-len=2"
    with ExitStack() as stack:
        superlink = [str(BIN / "flower-superlink"), "--insecure", "--port", str(link)]
        superlink += ["--disable-runtime-dependency-installation"]
        stack.enter_context(child_process(superlink, tmp_path / "superlink.log", env, 30))
        for k, data in enumerate(files):
            node = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}"]
            own = f'data-file="{data}" emulator-dir="{dirs.emulator}" server-url="{server.url}"'
            node += ["--port", str(free_port()), "--node-config", own]
            stack.enter_context(child_process(node, tmp_path / f"supernode{k}.log", env, 30))

        # Execute
        command = [str(BIN / "flwr"), "run", str(APP_DIR), "local-deployment", "--stream"]
        result = subprocess.run(
            [*command, "--run-config", run_config], env=env, capture_output=True, text=True, timeout=300
        )

    # Assert: one round with both parties, and the joint prefix saved
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "rounds.jsonl").is_file(), result.stdout[-3000:]
    (record,) = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert (record["round"], record["parties"], record["failed"]) == (1, 2, 0)
    assert record["bytes_received"] > 0
    assert Prefix.load(out / "prefix").config.num_layers == 4
