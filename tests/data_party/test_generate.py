"""Split generation against the whole model's Hugging Face `generate`, through a real server on loopback."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import ARCHS, random_batch
from live_server import LiveServer
from split_helpers import FAST_RETRIES, make_dirs, seeded_prefix, server_settings
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.model.loading import load_causal_lm
from splitprefix.model.prefixed import generate_with_prefix
from splitprefix.model_party.app import create_app

NEW_TOKENS = 10


@pytest.fixture(scope="module", params=ARCHS)
def served(request, tmp_path_factory):
    """(dirs, whole model, server) for one architecture."""
    dirs = make_dirs(tmp_path_factory.mktemp(request.param), request.param)
    with LiveServer(create_app(server_settings(dirs))) as live:
        yield dirs, load_causal_lm(dirs.full), live


def open_model(dirs, url, head="server", kv=None, **settings) -> SplitModel:
    model = SplitModel.open(dirs.emulator, ClientSettings(url, head=head, **settings))
    if kv is not None:
        model.kv = kv
    return model


@pytest.mark.parametrize("head", ["server", "client"])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_greedy_split_generation_is_token_identical_to_whole_model_generate(served, head, with_prefix):
    # Prepare: a left-padded batch, and the same prefix for the whole model and the split
    dirs, whole, server = served
    ids, mask = random_batch(batch=3, length=7, padding="left")
    kv = seeded_prefix(whole.config)().detach() if with_prefix else None
    expected = generate_with_prefix(whole, ids, mask, kv, NEW_TOKENS, pad_token_id=0)

    # Execute
    with open_model(dirs, server.url, head, kv) as model:
        generated = model.generate_ids(ids, mask, GenerationConfig(max_new_tokens=NEW_TOKENS))

    # Assert
    assert torch.equal(generated, expected)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    dirs = make_dirs(tmp_path_factory.mktemp("llama"))
    return dirs, load_causal_lm(dirs.full)


def test_seeded_sampling_is_reproducible_and_the_seed_matters(llama):
    dirs, _ = llama
    ids, mask = random_batch(batch=2, length=5, padding="left")
    config = dict(max_new_tokens=12, do_sample=True, temperature=1.5, stop_at_eos=False)
    with LiveServer(create_app(server_settings(dirs))) as server, open_model(dirs, server.url) as model:
        first = model.generate_ids(ids, mask, GenerationConfig(seed=7, **config))
        again = model.generate_ids(ids, mask, GenerationConfig(seed=7, **config))
        other = model.generate_ids(ids, mask, GenerationConfig(seed=8, **config))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.9)])
def test_sampling_with_the_head_on_the_server_equals_sampling_with_the_head_here(llama, top_k, top_p):
    # with top-k alone head=server sends only the k best logits, with top-p all of them
    dirs, _ = llama
    ids, mask = random_batch(batch=2, length=5, padding="left")
    config = GenerationConfig(
        max_new_tokens=12, do_sample=True, top_k=top_k, top_p=top_p, seed=3, stop_at_eos=False
    )
    assert config.server_top_k == top_k
    with LiveServer(create_app(server_settings(dirs))) as server:
        with open_model(dirs, server.url, "server") as model:
            from_top_k = model.generate_ids(ids, mask, config)
        with open_model(dirs, server.url, "client") as model:
            from_full = model.generate_ids(ids, mask, config)
    assert torch.equal(from_top_k, from_full)


def test_a_server_restart_mid_generation_is_recovered_transparently(llama):
    # Prepare
    dirs, whole = llama
    ids, mask = random_batch(batch=3, length=6, padding="left")
    kv = seeded_prefix(whole.config)().detach()
    expected = generate_with_prefix(whole, ids, mask, kv, NEW_TOKENS, pad_token_id=0)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    server = LiveServer(create_app(server_settings(dirs))).start()
    with server, open_model(dirs, server.url, kv=kv, **FAST_RETRIES) as model:
        # Execute: the server crashes and comes back (sessions gone) after three tokens
        tokens = []
        for step, token in enumerate(model.iter_tokens(ids, mask, config)):
            tokens.append(token)
            if step == 2:
                server.restart(app=create_app(server_settings(dirs)))
        # Assert
        assert model.recoveries == 1
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def test_an_expired_session_is_reopened_and_generation_carries_on(llama):
    dirs, whole = llama
    ids, mask = random_batch(batch=2, length=6, padding="left")
    expected = generate_with_prefix(whole, ids, mask, None, 6, pad_token_id=0)
    server = LiveServer(create_app(server_settings(dirs, session_ttl_s=0.3))).start()
    with server, open_model(dirs, server.url) as model:
        tokens = []
        for step, token in enumerate(model.iter_tokens(ids, mask, GenerationConfig(max_new_tokens=6))):
            tokens.append(token)
            if step in (1, 3):
                time.sleep(0.5)  # idle past the session's expiry
        assert model.recoveries == 2
        assert len(server.app.state.generation.sessions) == 0  # closed at the end
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def test_text_generation_streams_and_cuts_at_a_stop_string(llama):
    dirs, _ = llama
    with LiveServer(create_app(server_settings(dirs))) as server, open_model(dirs, server.url) as model:
        free = model.generate(
            ["The quick brown", "Customer:"], GenerationConfig(max_new_tokens=8, stop_at_eos=False)
        )
        stop = free[0].text[2:4]
        pieces: list[tuple[int, str]] = []
        config = GenerationConfig(max_new_tokens=8, stop=(stop,), stop_at_eos=False)
        cut = model.generate(
            ["The quick brown", "Customer:"], config, on_text=lambda r, t: pieces.append((r, t))
        )
    assert free[0].finish_reason == "length" and len(free[0].token_ids) == 8
    assert cut[0].text == free[0].text[: free[0].text.find(stop)] and cut[0].finish_reason == "stop"
    assert "".join(t for r, t in pieces if r == 0) == cut[0].text
    assert "".join(t for r, t in pieces if r == 1) == cut[1].text


def test_a_saved_prefix_directory_is_generated_with_as_the_whole_model_would(llama, tmp_path):
    dirs, whole = llama
    prefix = seeded_prefix(whole.config, seed=4)
    prefix.save(tmp_path / "prefix")
    ids, mask = random_batch(batch=2, length=5, padding="left")
    expected = generate_with_prefix(whole, ids, mask, prefix().detach(), 6, pad_token_id=0)
    with LiveServer(create_app(server_settings(dirs))) as server:
        settings = ClientSettings(server.url, head="client")
        with SplitModel.open(dirs.emulator, settings, tmp_path / "prefix") as model:
            generated = model.generate_ids(ids, mask, GenerationConfig(max_new_tokens=6))
    assert torch.equal(generated, expected)


def test_every_hidden_state_that_leaves_passes_through_outgoing(llama):
    # Prepare: a model whose hook records what it is given and zeroes it
    dirs, _ = llama
    seen: list[tuple[int, ...]] = []

    class Recording(SplitModel):
        def _outgoing(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(hidden.shape))
            return torch.zeros_like(hidden)

    ids, mask = random_batch(batch=2, length=5, padding="left")
    config = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    with LiveServer(create_app(server_settings(dirs))) as server:
        settings = ClientSettings(server.url, head="client")
        with SplitModel.open(dirs.emulator, settings) as plain:
            normal = plain.generate_ids(ids, mask, config)
        hooked = Recording(open_model(dirs, server.url, "client").split)
        with hooked:
            # Execute
            zeroed = hooked.generate_ids(ids, mask, config)

    # Assert: the prefill and every step went through the hook, and what it returned was sent
    assert seen == [(2, 5, 64), (2, 1, 64), (2, 1, 64), (2, 1, 64)]
    # all-zero hidden states give the server the same input at every step, hence the same token
    assert (zeroed == zeroed[:, :1]).all() and not torch.equal(zeroed, normal)


def test_generation_with_the_privacy_option_sends_clipped_states_and_noise_is_seeded(llama):
    # Prepare: a clip norm well below the tiny model's layer-K norms, with and without noise
    dirs, _ = llama
    sent: list[torch.Tensor] = []

    class Recording(SplitModel):
        def _outgoing(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
            sent.append(super()._outgoing(hidden, token_mask))
            return sent[-1]

    ids, mask = random_batch(batch=2, length=5, padding="left")
    config = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    clip_only, noisy = (
        PrivacyConfig(clip_norm=0.1),
        PrivacyConfig(clip_norm=0.1, noise_multiplier=1.0, seed=3),
    )
    with LiveServer(create_app(server_settings(dirs))) as server:
        settings = ClientSettings(server.url, head="client")

        def run(privacy: PrivacyConfig | None, model_class: type[SplitModel] = SplitModel) -> torch.Tensor:
            with model_class.open(dirs.emulator, settings, privacy=privacy) as model:
                return model.generate_ids(ids, mask, config)

        # Execute
        run(clip_only, Recording)
        noisy_a, noisy_b, plain = run(noisy), run(noisy), run(None)

    # Assert: every sent state is within the clip norm, padding is zeroed, and the noise is seeded
    real = [sent[0][mask.bool()]] + [h.flatten(0, 1) for h in sent[1:]]  # (n, d) each
    norms = torch.cat([h.norm(dim=-1) for h in real])
    assert torch.allclose(norms, torch.full_like(norms, 0.1), atol=1e-5)  # all above 0.1 before
    assert (sent[0][~mask.bool()] == 0).all()
    assert torch.equal(noisy_a, noisy_b) and not torch.equal(noisy_a, plain)
