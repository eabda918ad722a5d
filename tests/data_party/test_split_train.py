"""Split training over real HTTP on loopback: exactness against whole-model training, faults, resume."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from live_server import LiveServer
from split_helpers import (
    FAST_RETRIES,
    SHORT_RUN,
    TIGHT,
    encoded_examples,
    make_dirs,
    seeded_prefix,
    server_settings,
    write_jsonl,
)
from splitprefix.data.batching import resolve_pad_id
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import SplitSession, open_split
from splitprefix.data_party.split_train import SplitTrainConfig, train_split
from splitprefix.data_party.train import TrainConfig, local_loss_fn, train_prefix
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix
from splitprefix.model_party.app import create_app
from splitprefix.model_party.validation import has_forward_inputs


@pytest.fixture(scope="module")
def whole_run(dirs):
    """The reference: the same training run on the whole model in this process."""
    full, tok = load_causal_lm(dirs.full), load_tokenizer(dirs.full)
    prefix = seeded_prefix(full.config)
    history = train_prefix(prefix, local_loss_fn(full), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN)
    return history.losses, prefix().detach()


def split_run(dirs, url, config=SHORT_RUN, **settings):
    """The same run through the split; returns (losses, final kv, session traffic)."""
    session = open_split(dirs.emulator, ClientSettings(url, **settings))
    try:
        prefix = seeded_prefix(load_causal_lm(dirs.full).config)
        tok = session.tokenizer
        history = train_prefix(prefix, session.loss_fn(), encoded_examples(tok), resolve_pad_id(tok), config)
        return history.losses, prefix().detach(), session.client.traffic
    finally:
        session.close()


def record_backwards(server, monkeypatch) -> list[bool]:
    """Whether each backward the server gets carries the forward inputs (the recompute path)."""
    backend, seen = server.app.state.backend, []
    real = backend.backward

    def spy(tensors, meta, client):
        seen.append(has_forward_inputs(tensors))
        return real(tensors, meta, client)

    monkeypatch.setattr(backend, "backward", spy)
    return seen


@pytest.mark.parametrize("head", ["client", "server"])
@pytest.mark.parametrize("keep_graph", [True, False], ids=["graph-held", "recompute"])
def test_split_training_equals_whole_model_training(dirs, server, whole_run, monkeypatch, head, keep_graph):
    # Prepare
    whole_losses, whole_kv = whole_run
    backwards = record_backwards(server, monkeypatch)

    # Execute
    losses, kv, traffic = split_run(dirs, server.url, head=head, keep_graph=keep_graph)

    # Assert: same per-step losses and final prefix, over the backward path asked for
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole_losses), **TIGHT)
    torch.testing.assert_close(kv, whole_kv, **TIGHT)
    # head=server takes one round trip per step: the loss request returns the gradients
    assert backwards == ([not keep_graph] * SHORT_RUN.steps if head == "client" else [])
    assert traffic.requests == (2 if head == "client" else 1) * SHORT_RUN.steps + 1  # + /v1/info
    assert traffic.retries == 0 and traffic.recomputes == 0
    assert len(server.app.state.backend.graphs) == 0  # every held graph was used and freed


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2"])
def test_split_training_is_exact_for_every_architecture(tmp_path, arch):
    dirs = make_dirs(tmp_path, arch)
    full, tok = load_causal_lm(dirs.full), load_tokenizer(dirs.full)
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, lr=5e-2)
    whole = seeded_prefix(full.config)
    whole_losses = train_prefix(
        whole, local_loss_fn(full), encoded_examples(tok), resolve_pad_id(tok), config
    ).losses

    with LiveServer(create_app(server_settings(dirs))) as live:
        losses, kv, _ = split_run(dirs, live.url, config, head="server")

    torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole_losses), **TIGHT)
    torch.testing.assert_close(kv, whole().detach(), **TIGHT)


def test_bf16_wire_trains_and_tracks_the_exact_run(dirs, server, whole_run):
    whole_losses, _ = whole_run
    config = TrainConfig(steps=8, batch_size=4, warmup_steps=1, lr=5e-2)

    losses, _, _ = split_run(dirs, server.url, config, wire_dtype="bf16")

    torch.testing.assert_close(torch.tensor(losses[:4]), torch.tensor(whole_losses), atol=5e-2, rtol=0)
    assert sum(losses[-3:]) / 3 < losses[0]


def test_training_survives_server_restarts_that_lose_its_state(dirs, whole_run):
    # Prepare: the server "dies" before step 2's forward and between step 3's forward and backward;
    # each time a fresh app comes back, as a restarted process would, holding no graph
    whole_losses, whole_kv = whole_run
    server = LiveServer(create_app(server_settings(dirs))).start()

    def restart_soon():
        server.stop()
        server.app = create_app(server_settings(dirs))
        threading.Timer(0.3, server.start).start()

    session = open_split(dirs.emulator, ClientSettings(server.url, head="client", **FAST_RETRIES))
    calls = {"forward": 0, "backward": 0}

    def failing(name, real, at):
        def call(*args):
            calls[name] += 1
            if calls[name] == at:
                restart_soon()
            return real(*args)

        return call

    session.client.forward = failing("forward", session.client.forward, 2)  # type: ignore[method-assign]
    session.client.backward = failing("backward", session.client.backward, 3)  # type: ignore[method-assign]
    prefix = seeded_prefix(load_causal_lm(dirs.full).config)
    tok = session.tokenizer

    # Execute
    try:
        history = train_prefix(
            prefix, session.loss_fn(), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN
        )
    finally:
        session.close()
        server.stop()

    # Assert: the run completed, and the faults did not change a number
    assert session.client.traffic.retries >= 2 and session.client.traffic.recomputes == 1
    torch.testing.assert_close(torch.tensor(history.losses), torch.tensor(whole_losses), **TIGHT)
    torch.testing.assert_close(prefix().detach(), whole_kv, **TIGHT)


def test_a_crashed_client_resumes_from_its_last_checkpoint(dirs, server, tmp_path, monkeypatch):
    # Prepare
    data = write_jsonl(tmp_path / "train.jsonl")
    train = TrainConfig(steps=4, batch_size=4, warmup_steps=1, lr=5e-2, checkpoint_every=2)
    config = SplitTrainConfig(prefix_len=2, eval_fraction=0, train=train)
    settings = ClientSettings(server.url, head="client")
    train_split(dirs.emulator, settings, data, tmp_path / "straight", config)
    real_loss_fn = SplitSession.loss_fn

    def crashing_loss_fn(session):
        inner, calls = real_loss_fn(session), []

        def loss_fn(batch, kv):
            calls.append(1)
            if len(calls) == 3:  # the data party's process dies during step 3
                raise KeyboardInterrupt
            return inner(batch, kv)

        return loss_fn

    # Execute
    monkeypatch.setattr(SplitSession, "loss_fn", crashing_loss_fn)
    with pytest.raises(KeyboardInterrupt):
        train_split(dirs.emulator, settings, data, tmp_path / "resumed", config)
    assert (tmp_path / "resumed" / "checkpoint" / "step-0000002").is_dir()
    monkeypatch.undo()
    train_split(dirs.emulator, settings, data, tmp_path / "resumed", config)

    # Assert
    torch.testing.assert_close(Prefix.load(tmp_path / "resumed")(), Prefix.load(tmp_path / "straight")())
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert not (tmp_path / "resumed" / "checkpoint").exists()
