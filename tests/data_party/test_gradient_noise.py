"""Noise on the gradient the data party sends back: its scale, where it goes, and that it is what
the backward request carries."""

from __future__ import annotations

import pytest
import torch

from splitprefix.data_party.gradient_noise import GradientNoise, GradientNoiser, noise_gradient
from splitprefix.errors import ConfigError


def _grad_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(2, 50, 256, generator=gen)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 40:] = 0
    return grad * mask[..., None], mask


def test_the_noise_has_rho_times_the_rows_rms_gradient_norm_and_spares_padding():
    grad, mask = _grad_and_mask()

    noised = noise_gradient(grad, mask, 4.0, torch.Generator().manual_seed(1))

    noise = noised - grad
    rms = grad[0].norm(dim=-1).pow(2).mean().sqrt()
    ratio = noise[0].norm(dim=-1).mean() / rms
    assert 3.8 < float(ratio) < 4.2
    assert torch.equal(noised[1, 40:], torch.zeros(10, 256))  # padding: zero in, zero out
    assert (noise[1, :40].norm(dim=-1) > 0).all()


def test_without_a_seed_every_draw_differs():
    grad, mask = _grad_and_mask()
    assert not torch.equal(noise_gradient(grad, mask, 1.0), noise_gradient(grad, mask, 1.0))


def test_the_noiser_changes_the_gradient_that_flows_back_and_nothing_when_off():
    grad, mask = _grad_and_mask()
    for config, changed in ((GradientNoise(), False), (GradientNoise(2.0, seed=3), True)):
        leaf = torch.zeros(2, 50, 256, requires_grad=True)
        returned = GradientNoiser(config)(leaf * 1.0, mask)
        (returned * grad).sum().backward()
        assert (not torch.equal(leaf.grad, grad)) == changed


def test_a_negative_multiplier_is_refused():
    with pytest.raises(ConfigError, match="gradient noise multiplier"):
        GradientNoise(-1.0)
