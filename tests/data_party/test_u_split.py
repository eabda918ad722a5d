"""The U-shaped split (the data party keeps the bottom K and the top M layers) equals the whole
model: loss and prefix gradients for every registry family, and a short training run.

The server's layers [K, L - M) run in this process behind RemoteTop's interface (`LocalTop`)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from conftest import build_tiny_model, random_batch
from families import FAMILY_VARIANTS
from live_server import LiveServer
from split_helpers import SHORT_RUN, TIGHT, SplitDirs, encoded_examples, make_dirs, seeded_prefix, write_jsonl
from splitprefix.audit.observe import LocalTop
from splitprefix.data.batching import Batch, resolve_pad_id
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.remote import ClientSettings, IncompatibleServerError, RemoteError
from splitprefix.data_party.session import open_split
from splitprefix.data_party.split_train import SplitTrainConfig, train_split
from splitprefix.data_party.train import local_loss_fn, train_prefix
from splitprefix.data_party.u_split import check_client_layers, u_split_loss_fn
from splitprefix.errors import ConfigError
from splitprefix.model.emulator import EmulatorManifest, top_fingerprint
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefixed import generate_with_prefix
from splitprefix.model.split import Bottom, ClientTop
from splitprefix.model_party.app import create_app
from splitprefix.model_party.compress import emulate
from splitprefix.model_party.settings import ServerSettings

K = 1
GRAD = dict(atol=1e-7, rtol=1e-5)


def u_loss_fn(model, client_layers: int):
    top = LocalTop(model, K, "client", client_layers)
    return u_split_loss_fn(Bottom(model, K), top, ClientTop(model, client_layers), K)


def loss_and_grad(loss_fn, batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kv = kv.detach().requires_grad_(True)
    loss, _ = loss_fn(batch, kv)
    loss.backward()
    return loss.detach(), kv.grad


@pytest.mark.parametrize("variant", sorted(FAMILY_VARIANTS))
@pytest.mark.parametrize("client_layers", [1, 2])
def test_u_split_loss_and_prefix_gradients_equal_the_whole_model(variant, client_layers):
    # Prepare: right padding, a prefix over all 4 layers, labels on the second half of each row
    model = build_tiny_model(variant)
    ids, mask = random_batch(batch=3, length=10, padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    batch = Batch(ids, mask, labels)
    kv = seeded_prefix(model.config)().detach()

    # Execute
    expected = loss_and_grad(local_loss_fn(model), batch, kv)
    actual = loss_and_grad(u_loss_fn(model, client_layers), batch, kv)

    # Assert: equal loss and gradients, and the kept top layers' prefix gets a gradient
    torch.testing.assert_close(actual[0], expected[0], **TIGHT)
    torch.testing.assert_close(actual[1], expected[1], **GRAD)
    assert (actual[1][-client_layers:].abs().amax() > 0).all()


def test_u_split_training_equals_whole_model_training(tmp_path):
    # Prepare
    dirs = make_dirs(tmp_path)
    model, tok = load_causal_lm(dirs.full), load_tokenizer(dirs.full)
    runs = []

    # Execute: the same seeded run through the whole model and through the U-split (M = 2)
    for loss_fn in (local_loss_fn(model), u_loss_fn(model, 2)):
        prefix = seeded_prefix(model.config)
        history = train_prefix(prefix, loss_fn, encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN)
        runs.append((torch.tensor(history.losses), prefix().detach()))

    # Assert
    torch.testing.assert_close(runs[1][0], runs[0][0], **TIGHT)
    torch.testing.assert_close(runs[1][1], runs[0][1], **TIGHT)


@pytest.mark.parametrize("client_layers", [-1, 3, 4])
def test_client_layers_that_leave_the_server_no_layer_are_refused(client_layers):
    with pytest.raises(ConfigError, match="client_layers"):
        check_client_layers(K, client_layers, 4)


# --- over HTTP: a real server on loopback that runs [K, L - M) ----------------------------------


@pytest.fixture(scope="module")
def u_dirs(tmp_path_factory):
    """The tiny 4-layer model and an emulator cut at K = 1 that ships its last layer exactly."""
    root = tmp_path_factory.mktemp("u-split")
    full = make_dirs(root, split_at=1).full
    emulator = root / "emu-u"
    emulate(str(full), split_at=1, keep=2, out=emulator, client_layers=1)
    return SplitDirs(full, emulator)


@pytest.fixture(scope="module")
def u_server(u_dirs):
    settings = ServerSettings(model_dir=str(u_dirs.full), split_at=1, port=0, max_client_layers=1)
    with LiveServer(create_app(settings)) as live:
        yield live


def test_the_emulator_ships_the_top_layers_bit_for_bit_with_their_fingerprint(u_dirs, u_server):
    full, emulator = load_causal_lm(u_dirs.full), load_causal_lm(u_dirs.emulator)
    manifest = EmulatorManifest.load(u_dirs.emulator)

    info = httpx.get(u_server.url + "/v1/info").json()

    assert manifest.client_layers == 1 and manifest.kept_layers[-1] == 3
    for name, tensor in ClientTop(full, 1).stack.state_dict().items():
        assert torch.equal(ClientTop(emulator, 1).stack.state_dict()[name], tensor), name
    assert manifest.top_sha256 == {"1": top_fingerprint(full, 1)} == info["fingerprints"]["top_sha256"]
    assert info["max_client_layers"] == 1


@pytest.mark.parametrize("keep_graph", [True, False], ids=["graph-held", "recompute"])
def test_u_split_training_over_http_equals_whole_model_training(u_dirs, u_server, monkeypatch, keep_graph):
    # Prepare: the reference on the whole model, and a spy on what the server is sent
    full, tok = load_causal_lm(u_dirs.full), load_tokenizer(u_dirs.full)
    whole = seeded_prefix(full.config)
    reference = train_prefix(
        whole, local_loss_fn(full), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN
    )
    backend, sent = u_server.app.state.backend, []
    real = backend.forward
    monkeypatch.setattr(
        backend, "forward", lambda t, m, c: sent.append(t["prefix_kv"].shape[0]) or real(t, m, c)
    )
    settings = ClientSettings(u_server.url, head="client", client_layers=1, keep_graph=keep_graph)

    # Execute
    session = open_split(u_dirs.emulator, settings)
    try:
        prefix = seeded_prefix(full.config)
        history = train_prefix(
            prefix, session.loss_fn(), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN
        )
    finally:
        session.close()

    # Assert: exact, and the server only ever got the prefix of its layers [1, 3)
    torch.testing.assert_close(torch.tensor(history.losses), torch.tensor(reference.losses), **TIGHT)
    torch.testing.assert_close(prefix().detach(), whole().detach(), **TIGHT)
    assert sent == [2] * SHORT_RUN.steps


def test_a_server_that_allows_fewer_client_layers_is_refused_before_training(u_dirs):
    settings = ServerSettings(model_dir=str(u_dirs.full), split_at=1, port=0)  # max_client_layers = 0
    with (
        LiveServer(create_app(settings)) as live,
        pytest.raises(IncompatibleServerError, match="client_layers: the server allows M <= 0"),
    ):
        open_split(u_dirs.emulator, ClientSettings(live.url, head="client", client_layers=1))


def test_a_forward_asking_for_unallowed_client_layers_gets_a_422(u_dirs, u_server):
    session = open_split(u_dirs.emulator, ClientSettings(u_server.url, head="client", client_layers=1))
    try:
        session.client._identity["client_layers"] = 2  # type: ignore[index]
        with pytest.raises(RemoteError) as caught:
            session.client.forward({}, "s1", keep_graph=False)
    finally:
        session.close()
    assert caught.value.status == 422 and caught.value.code == "client_layers_not_allowed"


def test_client_layers_need_head_client_and_an_emulator_that_ships_them(u_dirs, u_server):
    with pytest.raises(ConfigError, match="head=client"):
        ClientSettings(u_server.url, head="server", client_layers=1)
    with pytest.raises(ConfigError, match="ships the full model's last 1 layers"):
        open_split(u_dirs.emulator, ClientSettings(u_server.url, head="client", client_layers=2))


def test_train_split_keeps_the_top_layer_and_scores_exact_match_through_the_u_split(
    u_dirs, u_server, tmp_path
):
    # Prepare
    data = write_jsonl(tmp_path / "train.jsonl")
    config = SplitTrainConfig(prefix_len=2, eval_fraction=0.2, train=SHORT_RUN)
    settings = ClientSettings(u_server.url, head="client", client_layers=1)

    # Execute
    report = train_split(u_dirs.emulator, settings, data, tmp_path / "out", config)

    # Assert
    assert report["held_out"]["loss"] > 0 and "exact_match" in report["held_out"]
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["client"]["client_layers"] == 1


@pytest.mark.parametrize("padding", [None, "left"])
def test_greedy_generation_through_the_u_split_equals_hf_generate(u_dirs, u_server, monkeypatch, padding):
    # Prepare: the server's sessions get only the prefix of its layers [1, 3)
    full = load_causal_lm(u_dirs.full)
    ids, mask = random_batch(batch=3, length=6, padding=padding)
    ids = ids % 320  # the tiny tokenizer's vocabulary
    kv = seeded_prefix(full.config)().detach()
    expected = generate_with_prefix(full, ids, mask, kv, 5, pad_token_id=0)
    generation, sent = u_server.app.state.generation, []
    real = generation.open
    monkeypatch.setattr(
        generation, "open", lambda t, m, c: sent.append(t["prefix_kv"].shape[0]) or real(t, m, c)
    )

    # Execute
    settings = ClientSettings(u_server.url, head="client", client_layers=1)
    with SplitModel.open(u_dirs.emulator, settings) as model:
        model.kv = kv
        generated = model.generate_ids(ids, mask, GenerationConfig(max_new_tokens=5))

    # Assert
    assert torch.equal(generated, expected)
    assert sent == [2]


def test_a_session_lost_mid_generation_is_reopened_without_rerunning_the_kept_layers(u_dirs):
    # Prepare: the reopened session resends every state so far; the top layer here must skip the
    # tokens it already ran, or its cache would hold them twice
    full = load_causal_lm(u_dirs.full)
    ids, mask = random_batch(batch=2, length=6, padding="left")
    ids = ids % 320
    kv = seeded_prefix(full.config)().detach()
    expected = generate_with_prefix(full, ids, mask, kv, 6, pad_token_id=0)

    def settings(**extra):
        return ServerSettings(model_dir=str(u_dirs.full), split_at=1, port=0, max_client_layers=1, **extra)

    server = LiveServer(create_app(settings(session_ttl_s=0.3))).start()
    client = ClientSettings(server.url, head="client", client_layers=1)
    with server, SplitModel.open(u_dirs.emulator, client) as model:
        model.kv = kv
        tokens = []
        for step, token in enumerate(model.iter_tokens(ids, mask, GenerationConfig(max_new_tokens=6))):
            tokens.append(token)
            if step in (1, 3):
                time.sleep(0.5)  # idle past the session's expiry

        # Assert
        assert model.recoveries == 2
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def test_a_top_that_is_not_the_models_is_refused_by_its_fingerprint(u_dirs, u_server):
    session = open_split(u_dirs.emulator, ClientSettings(u_server.url, head="client", client_layers=1))
    try:
        session.client._identity["top_sha256"] = "0" * 64  # type: ignore[index]
        with pytest.raises(RemoteError) as caught:
            session.client.forward({}, "s1", keep_graph=False)
    finally:
        session.close()
    assert caught.value.status == 422 and caught.value.code == "fingerprint_mismatch"


def test_a_server_keeping_the_head_cannot_offer_client_layers(u_dirs):
    with pytest.raises(ConfigError, match="max_client_layers > 0 needs head=client"):
        ServerSettings(model_dir=str(u_dirs.full), split_at=1, head="server", max_client_layers=1)
    with pytest.raises(ConfigError, match="must leave this server a layer"):
        create_app(ServerSettings(model_dir=str(u_dirs.full), split_at=1, max_client_layers=3))


def test_train_split_with_gradient_noise_sends_noised_gradients_and_records_rho(
    u_dirs, u_server, monkeypatch, tmp_path
):
    # Prepare: the gradients the server gets back, with and without the noise
    data = write_jsonl(tmp_path / "train.jsonl")
    backend, got = u_server.app.state.backend, []
    real = backend.backward
    monkeypatch.setattr(backend, "backward", lambda t, m, c: got.append(t["grad_output"]) or real(t, m, c))
    settings = ClientSettings(u_server.url, head="client")
    runs = []

    # Execute
    for rho in (0.0, 4.0):
        got.clear()
        config = SplitTrainConfig(prefix_len=2, eval_fraction=0, train=SHORT_RUN, grad_noise=rho)
        train_split(u_dirs.emulator, settings, data, tmp_path / f"rho-{rho}", config)
        runs.append(list(got))

    # Assert: the first step's gradient differs (same prefix, same batch)
    assert not torch.allclose(runs[0][0], runs[1][0])
    assert json.loads((tmp_path / "rho-4.0" / "train_config.json").read_text())["config"]["grad_noise"] == 4.0
