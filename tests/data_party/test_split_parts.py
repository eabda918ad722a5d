"""A split session loads only what the data party runs: the bottom, and the head with head=client.

The kept upper layers of the emulator are for offsite training only: a split session never reads
them, so deleting or corrupting them in the emulator's file changes nothing. The bottom is hashed
once per process and file state, not on every session.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from split_helpers import EXAMPLES, PREFIX_LEN, SHORT_RUN, SPLIT_AT, encoded_examples
from splitprefix.data.batching import resolve_pad_id
from splitprefix.data_party.generate import split_scorer
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import train_prefix
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.model import emulator as emulator_module
from splitprefix.model.emulator import VERIFIED_FILE, FingerprintMismatchError
from splitprefix.model.loading import load_causal_lm
from splitprefix.model.partial_load import SINGLE_FILE, CheckpointReader
from splitprefix.model.prefix import Prefix
from splitprefix.runtime import RuntimeSettings

UPPER = f"model.layers.{SPLIT_AT}."  # the emulator's only kept upper layer (K = 2, N = 1)


def _rewrite(emulator_dir, change):
    """Rewrite the emulator's weights file with `change(name, tensor)` (None drops the tensor)."""
    path = emulator_dir / SINGLE_FILE
    tensors = {name: change(name, tensor) for name, tensor in load_file(path).items()}
    save_file({k: v for k, v in tensors.items() if v is not None}, path, metadata={"format": "pt"})


def _train_and_evaluate(emulator_dir, url, head):
    """Per-step losses, final prefix and held-out evaluation (loss, exact match, samples) of a
    short split run."""
    session = open_split(emulator_dir, ClientSettings(url, head=head))
    try:
        torch.manual_seed(0)
        prefix = Prefix(session.prefix_config(PREFIX_LEN))  # over all L layers of the server's model
        tok = session.tokenizer
        history = train_prefix(
            prefix, session.loss_fn(), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN
        )
        report = evaluate(
            split_scorer(session), tok, EXAMPLES[:4], prefix().detach(), EvalConfig(max_new_tokens=3)
        )
        return history.losses, prefix().detach(), report
    finally:
        session.close()


@pytest.mark.parametrize("head", ["client", "server"])
def test_a_split_session_reads_no_kept_upper_layer_tensor(dirs, server, monkeypatch, head):
    # Prepare
    read: list[str] = []
    real = CheckpointReader.tensor
    monkeypatch.setattr(CheckpointReader, "tensor", lambda self, name: read.append(name) or real(self, name))

    # Execute
    session = open_split(dirs.emulator, ClientSettings(server.url, head=head))
    session.close()

    # Assert: the bottom was read (and the untied head with head=client), no upper layer
    assert any(name.startswith(f"model.layers.{SPLIT_AT - 1}.") for name in read)
    assert not [name for name in read if name.startswith(UPPER)]
    assert ("lm_head.weight" in read) == (head == "client")


@pytest.mark.parametrize("head", ["client", "server"])
@pytest.mark.parametrize("attack", ["deleted", "corrupted"])
def test_a_split_session_trains_the_same_without_the_kept_upper_layers(dirs, server, tmp_path, attack, head):
    # Prepare: a copy of the emulator whose upper layer is gone from the file, or all NaN
    attacked = tmp_path / "emulator"
    shutil.copytree(dirs.emulator, attacked)
    nan = None if attack == "deleted" else float("nan")
    _rewrite(
        attacked, lambda name, t: t if not name.startswith(UPPER) else (None if nan is None else t.fill_(nan))
    )

    # Execute
    intact_losses, intact_kv, intact_report = _train_and_evaluate(dirs.emulator, server.url, head)
    losses, kv, report = _train_and_evaluate(attacked, server.url, head)

    # Assert: the same losses, prefix and evaluation, bit for bit
    assert losses == intact_losses and torch.equal(kv, intact_kv)
    assert report == intact_report and "exact_match" in report


def test_the_bottom_is_hashed_once_per_file_state(dirs, server, tmp_path, monkeypatch):
    # Prepare: a fresh copy, which this process has not verified yet
    emulator = tmp_path / "emulator"
    shutil.copytree(dirs.emulator, emulator)
    hashed = []
    real = emulator_module.stored_bottom_fingerprint
    monkeypatch.setattr(emulator_module, "stored_bottom_fingerprint", lambda *a: hashed.append(1) or real(*a))
    settings = ClientSettings(server.url, head="client")

    # Execute: three sessions (three federation rounds), then one in a "new process" (a deployed
    # ClientApp runs each round in one), then the weights file is rewritten
    for _ in range(3):
        open_split(emulator, settings).close()
    in_process = len(hashed)
    monkeypatch.setattr(emulator_module, "_verified", set())
    open_split(emulator, settings).close()
    across_processes = len(hashed)
    stat = (emulator / SINGLE_FILE).stat()
    os.utime(emulator / SINGLE_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    open_split(emulator, settings).close()

    # Assert
    assert (in_process, across_processes, len(hashed)) == (1, 1, 2)
    assert (emulator / VERIFIED_FILE).is_file()


def test_a_tampered_bottom_is_refused_before_connecting_even_after_a_passed_check(dirs, server, tmp_path):
    # Prepare: an emulator that passed its check once, whose bottom then changes
    emulator = tmp_path / "emulator"
    shutil.copytree(dirs.emulator, emulator)
    open_split(emulator, ClientSettings(server.url, head="client")).close()
    _rewrite(emulator, lambda name, t: t + 1e-3 if name == "model.layers.0.mlp.up_proj.weight" else t)

    # Execute / Assert
    with pytest.raises(FingerprintMismatchError, match="bottom 2 layers differ"):
        open_split(emulator, ClientSettings("http://127.0.0.1:9", head="client"))  # nothing listens there


def test_an_emulator_that_cannot_be_written_is_still_checked_and_left_as_it_is(
    dirs, server, tmp_path, monkeypatch
):
    # Prepare: a copy without the record, in a folder that refuses writes (chmod does not stop root)
    emulator = tmp_path / "emulator"
    shutil.copytree(dirs.emulator, emulator, ignore=shutil.ignore_patterns(VERIFIED_FILE))
    before = sorted(p.name for p in emulator.iterdir())

    def refuse(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(emulator_module.Path, "write_text", refuse)
    hashed = []
    real = emulator_module.stored_bottom_fingerprint
    monkeypatch.setattr(emulator_module, "stored_bottom_fingerprint", lambda *a: hashed.append(1) or real(*a))

    # Execute
    open_split(emulator, ClientSettings(server.url, head="client")).close()

    # Assert
    assert hashed == [1] and sorted(p.name for p in emulator.iterdir()) == before


def test_the_parts_load_in_the_dtype_asked_for(dirs, server):
    runtime = RuntimeSettings(dtype="bf16")
    session = open_split(dirs.emulator, ClientSettings(server.url, head="client"), runtime=runtime)
    session.close()
    parts = [*session.bottom.parameters(), *session.head.parameters()]
    assert parts and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in parts)
    whole = load_causal_lm(dirs.emulator, torch.bfloat16)
    assert torch.equal(session.head.lm_head.weight, whole.lm_head.weight)
