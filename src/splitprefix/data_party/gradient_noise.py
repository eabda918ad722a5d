"""Gaussian noise on the gradient the data party sends back with head=client (and the U-split).

The model party can invert dL/dh into the target tokens (`audit.gradient_labels`). Keeping the top
M layers at the data party does not stop that on its own (measured in docs/privacy/audit.md), so the gradient
can also be noised before it leaves. For each row, every real position's gradient g_t gets

    g_t <- g_t + N(0, (rho * r / sqrt(d))^2 I_d),    r = sqrt(mean over the row's real t of ||g_t||^2)

so the noise's norm is about rho times the row's typical gradient norm: scale-free (the loss's
reduction does not matter), and positions without a loss get noise too, so zeros no longer mark the
prompt. It is a measured defence, not a DP guarantee: the scale r is the data's own. The noise comes
from the OS's cryptographic source unless a seed is asked for (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitprefix.data_party.privacy import os_normals
from splitprefix.errors import ConfigError


@dataclass(frozen=True)
class GradientNoise:
    """Noise on the gradient of the states the server returned, before it is sent back."""

    multiplier: float = 0.0
    """rho: the noise's norm relative to the row's RMS gradient norm; 0 = off."""
    seed: int | None = None
    """None = fresh noise from the OS's cryptographic source; an int replays a seeded stream (tests)."""

    def __post_init__(self) -> None:
        if not (self.multiplier >= 0 and math.isfinite(self.multiplier)):
            raise ConfigError(
                f"gradient noise multiplier must be a finite number >= 0; got {self.multiplier}"
            )

    @property
    def enabled(self) -> bool:
        return self.multiplier > 0


def noise_gradient(
    grad: torch.Tensor, token_mask: torch.Tensor, rho: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`grad` (B, T, d) plus noise of norm about rho x each row's RMS gradient norm, on real tokens
    (`token_mask` (B, T) is 1 there); padding stays zero."""
    real = token_mask.to(grad.device, torch.bool)  # (B, T)
    count = real.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    rms = ((grad.float().pow(2).sum(-1) * real).sum(-1, keepdim=True) / count).sqrt()  # (B, 1)
    shape = tuple(grad.shape)
    normals = os_normals(shape) if generator is None else torch.randn(shape, generator=generator)
    scale = (rho * rms / math.sqrt(shape[-1]))[..., None] * real[..., None]  # (B, T, 1)
    return grad + (normals.to(grad.device) * scale).to(grad.dtype)


class GradientNoiser:
    """Registers the noise on a returned tensor's gradient: the backward then sends the noised one."""

    def __init__(self, config: GradientNoise) -> None:
        self.config = config
        self.generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)

    def __call__(self, returned: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """`returned` (B, T, d), with a hook that noises its gradient; returned as is when off."""
        if self.config.enabled and returned.requires_grad:
            rho = self.config.multiplier
            returned.register_hook(lambda g: noise_gradient(g, token_mask, rho, self.generator))
        return returned
