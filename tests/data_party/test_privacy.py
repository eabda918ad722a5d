"""Clipping and Gaussian noise on the layer-K states: the mechanism alone, and on the real wire."""

from __future__ import annotations

import pytest
import torch

from conftest import random_batch
from split_helpers import SHORT_RUN, encoded_examples, seeded_prefix
from splitprefix.data.batching import resolve_pad_id
from splitprefix.data_party.privacy import HiddenPrivacy, PrivacyConfig, clip_tokens, os_normals, privatize
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.data_party.split_forward import run_split
from splitprefix.data_party.train import train_prefix
from splitprefix.errors import ConfigError
from splitprefix.model.loading import load_causal_lm


def states(batch: int = 4, length: int = 50, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (B, T, d) with token norms spread around 8, and a mask with right padding."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, d, generator=gen) * torch.rand(batch, length, 1, generator=gen) * 2
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, -5:] = 0
    return hidden, mask


def test_clipping_bounds_every_token_and_leaves_short_ones_untouched():
    hidden, mask = states()
    config = PrivacyConfig(clip_norm=6.0)

    out = privatize(hidden, mask, config, config.generator())

    norms, before = out.norm(dim=-1), hidden.norm(dim=-1)
    real = mask.bool()
    assert (norms[real] <= 6.0 * (1 + 1e-6)).all()
    assert torch.equal(out[real & (before <= 6.0)], hidden[real & (before <= 6.0)])
    torch.testing.assert_close(
        norms[real & (before > 6.0)], torch.full_like(norms[real & (before > 6.0)], 6.0)
    )
    assert (out[~real] == 0).all()


def test_noise_has_the_configured_standard_deviation_and_is_seeded():
    hidden, mask = states(batch=8, length=100)
    config = PrivacyConfig(clip_norm=3.0, noise_multiplier=0.5, seed=7)

    out = privatize(hidden, mask, config, config.generator())
    again = privatize(hidden, mask, config, config.generator())
    other = privatize(hidden, mask, PrivacyConfig(3.0, 0.5, seed=8), torch.Generator().manual_seed(8))

    noise = (out - clip_tokens(hidden, 3.0))[mask.bool()]  # 50k draws: std within ~1%
    assert abs(noise.std().item() - 1.5) < 0.03 and abs(noise.mean().item()) < 0.02
    assert torch.equal(out, again) and not torch.equal(out, other)


def reseed_and_subtract(sent: torch.Tensor, config: PrivacyConfig, seed: int) -> torch.Tensor:
    """The attack on a seeded stream: regenerate the first draw of seed `seed` and take it away."""
    guess = torch.randn(sent.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return sent - guess * config.noise_std


def test_the_default_noise_survives_reseeding_with_any_small_seed():
    # Prepare: a session with the defaults (no seed) sends one batch of clipped, noised states
    hidden, mask = states(batch=4, length=50)
    config = PrivacyConfig(clip_norm=3.0, noise_multiplier=0.5)
    sent = HiddenPrivacy(config)(hidden, mask)
    clipped, real = clip_tokens(hidden, 3.0), mask.bool()

    # Execute: the attacker tries seeds 0..99 and keeps the best guess
    residuals = [(reseed_and_subtract(sent, config, s) - clipped)[real].abs().max() for s in range(100)]

    # Assert: no seed comes anywhere near; the residual is noise of the same scale (std sigma*C = 1.5)
    assert min(residuals) > 3.0


def test_an_explicit_seed_replays_and_so_is_removable():
    # Prepare: the same attack against a run that asked for --noise-seed 0 (what every run was before)
    hidden, mask = states(batch=4, length=50)
    config = PrivacyConfig(clip_norm=3.0, noise_multiplier=0.5, seed=0)
    sent = HiddenPrivacy(config)(hidden, mask)

    # Execute
    recovered = reseed_and_subtract(sent, config, 0)

    # Assert: the clipped states come back to float precision, and a second session replays the first
    real = mask.bool()
    torch.testing.assert_close(recovered[real], clip_tokens(hidden, 3.0)[real], atol=1e-5, rtol=0)
    assert torch.equal(HiddenPrivacy(config)(hidden, mask), sent)


def test_two_sessions_with_the_default_noise_differ():
    hidden, mask = states()
    config = PrivacyConfig(clip_norm=3.0, noise_multiplier=0.5)
    assert config.generator() is None
    assert not torch.equal(HiddenPrivacy(config)(hidden, mask), HiddenPrivacy(config)(hidden, mask))


def test_os_noise_is_standard_normal():
    # ~100k draws: mean, std and the share beyond 2 standard deviations (4.55%) to about 1%
    draws = os_normals((3, 33_333))  # an odd count: Box-Muller makes pairs

    assert draws.shape == (3, 33_333) and draws.dtype == torch.float32
    assert abs(draws.mean().item()) < 0.01 and abs(draws.std().item() - 1) < 0.01
    assert abs((draws.abs() > 2).float().mean().item() - 0.0455) < 0.003
    assert torch.isfinite(draws).all()


def test_option_off_returns_the_states_themselves():
    hidden, mask = states()
    assert privatize(hidden, mask, PrivacyConfig(), torch.Generator()) is hidden


def test_gradients_flow_through_the_clipping():
    hidden, mask = states()
    hidden.requires_grad_(True)
    config = PrivacyConfig(clip_norm=6.0, noise_multiplier=0.1)

    privatize(hidden, mask, config, config.generator()).sum().backward()

    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=1.0),
        dict(clip_norm=0.0),
        dict(clip_norm=float("inf")),
        dict(clip_norm=1.0, noise_multiplier=-1),
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        PrivacyConfig(**kwargs)


def wire_hidden(server, monkeypatch) -> list[torch.Tensor]:
    """The `hidden` tensor of every forward request the server decodes."""
    backend, seen = server.app.state.backend, []
    real = backend.forward

    def spy(tensors, meta, client):
        seen.append(tensors["hidden"].clone())
        return real(tensors, meta, client)

    monkeypatch.setattr(backend, "forward", spy)
    return seen


def train_losses(dirs, url, privacy):
    session = open_split(dirs.emulator, ClientSettings(url, head="client"), privacy)
    try:
        prefix, tok = seeded_prefix(load_causal_lm(dirs.full).config), session.tokenizer
        history = train_prefix(
            prefix, session.loss_fn(), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN
        )
        return history.losses, prefix().detach()
    finally:
        session.close()


def test_split_training_with_the_option_off_is_bit_identical(dirs, server, monkeypatch):
    without = train_losses(dirs, server.url, None)
    sent = wire_hidden(server, monkeypatch)

    off = train_losses(dirs, server.url, PrivacyConfig(seed=3))

    assert off[0] == without[0] and torch.equal(off[1], without[1])
    assert len(sent) == SHORT_RUN.steps


def test_the_wire_carries_clipped_noised_states(dirs, server, monkeypatch):
    # Prepare: one batch through the split, and the same bottom run here without the option
    ids, mask = random_batch(batch=3, length=40, padding="right")
    config = PrivacyConfig(clip_norm=0.15, noise_multiplier=0.5, seed=1)
    session = open_split(dirs.emulator, ClientSettings(server.url, head="client"), config)
    kv = seeded_prefix(load_causal_lm(dirs.full).config)().detach()
    sent = wire_hidden(server, monkeypatch)

    # Execute
    try:
        with torch.no_grad():
            run_split(session.bottom, session.remote_top, ids, mask, kv, 2, session.privacy)
            session.privacy = None
            clean = run_split(session.bottom, _Capture(), ids, mask, kv, 2)
    finally:
        session.close()

    # Assert: wire - clip(clean) is noise of std sigma * C on real tokens, padding is zero
    (hidden,) = sent
    real = mask.bool()
    assert (clean.norm(dim=-1)[real] > 0.15).all()  # the clipping is active on every token
    noise = (hidden - clip_tokens(clean, 0.15))[real]  # ~6k draws: std within ~3%
    assert abs(noise.std().item() - 0.075) < 0.0075 and abs(noise.mean().item()) < 0.005
    assert (hidden[~real] == 0).all()


class _Capture:
    """A top part that returns the layer-K states it is given, unchanged."""

    head = "client"

    def __call__(self, x, top_kv):
        return x.hidden
