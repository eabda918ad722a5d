"""Clipping and Gaussian noise on the hidden states the data party sends to the model party.

The layer-K hidden states are the only view of the data party's text that crosses the wire, and
they can be partly inverted (see `splitprefix privacy-audit`). Before they leave, each real token's
state `h` (a d-vector) is

    clipped   h <- h * min(1, C / ||h||_2)
    noised    h <- h + N(0, (sigma * C)^2 I_d)

so every token's contribution is bounded by C and masked by noise of standard deviation sigma * C
per coordinate, as in the Gaussian mechanism. Padding positions are set to zero: the attention mask
already tells the model party where they are, and zero carries nothing else.

Where the noise comes from. By default every draw reads fresh bytes from the operating system's
cryptographic random source (`os.urandom`) and turns them into normals by the Box-Muller transform,
so there is no generator state at all: no seed to guess, nothing that a replay with seed 0 (or any
seed) could regenerate, and two runs never share noise. Only an explicit `seed` (`--noise-seed`)
switches to a seeded `torch.Generator`, whose stream anyone who knows the seed can regenerate and
subtract: use it for tests and replays only. The noise is added outside the autograd graph, so
gradients flow through the clipping only. `accounting` turns sigma and the releases into (epsilon,
delta).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from splitprefix.errors import ConfigError
from splitprefix.extras import check

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyConfig:
    """How the data party privatises its layer-K hidden states; saved with the training run."""

    clip_norm: float | None = None
    """C: each token's layer-K state is scaled down to L2 norm at most C before it leaves; unset = no
    clipping."""
    noise_multiplier: float = 0.0
    """sigma: Gaussian noise of standard deviation sigma * C is added to every coordinate sent (needs
    `clip_norm`)."""
    seed: int | None = None
    """Replay the noise from this seed, for tests only: whoever knows it can remove the noise. Unset:
    fresh noise from the OS's cryptographic source."""

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"clip_norm must be a finite number > 0; got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0; got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ConfigError(
                f"noise_multiplier {self.noise_multiplier} needs clip_norm: the noise's scale is sigma * C"
            )
        if self.noise_multiplier > 0:  # its (epsilon, delta) is reported at the end of the run
            check("opacus", "the privacy accounting of noised states")

    @property
    def enabled(self) -> bool:
        """False when the states would leave unchanged."""
        return self.clip_norm is not None

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise per coordinate: sigma * C."""
        return self.noise_multiplier * (self.clip_norm or 0.0)

    def generator(self) -> torch.Generator | None:
        """A fresh CPU generator seeded with `seed`; None (draw from the OS) when no seed was asked for."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


_MANTISSA = (1 << 53) - 1


def os_normals(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normals (float32) of `shape` from `os.urandom`, by the Box-Muller transform.

    Each uniform takes 53 random bits, u = (k + 1) / 2^53 in (0, 1], so log(u) is finite; one pair
    (u1, u2) gives the two independent normals sqrt(-2 ln u1) * (cos, sin)(2 pi u2).
    """
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)  # (2 * pairs,)
    uniform = ((raw & _MANTISSA).double() + 1.0) * 2.0**-53
    radius, angle = torch.sqrt(-2.0 * torch.log(uniform[:pairs])), (2 * math.pi) * uniform[pairs:]
    normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return normals.float().reshape(shape)


def clip_tokens(hidden: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each token's state (last dimension) to L2 norm at most `clip_norm`. (..., d) -> (..., d)"""
    norms = hidden.norm(dim=-1, keepdim=True)  # (..., 1)
    return hidden * (clip_norm / norms.clamp(min=clip_norm))


def privatize(
    hidden: torch.Tensor,
    token_mask: torch.Tensor,
    config: PrivacyConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The hidden states (B, T, d) as they may leave: clipped, noised, padding zeroed.

    `token_mask` (B, T) is 1 on real tokens. With `config.enabled` False, `hidden` itself is
    returned, so the output is bit-identical to not calling this at all. The noise comes from the
    OS's cryptographic source when `generator` is None; a seeded CPU `generator` advances by one draw
    of B * T * d normals instead.
    """
    if not config.enabled:
        return hidden
    assert config.clip_norm is not None
    out = clip_tokens(hidden, config.clip_norm)
    if config.noise_multiplier > 0:
        if generator is None:
            noise = os_normals(tuple(hidden.shape))  # (B, T, d)
        else:
            noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32)  # (B, T, d)
        out = out + (noise * config.noise_std).to(out.device, out.dtype)
    real = token_mask.to(out.device, torch.bool).unsqueeze(-1)  # (B, T, 1)
    return out.masked_fill(~real, 0.0)


class HiddenPrivacy:
    """`privatize` with its own noise source, for a session that sends many forwards."""

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.generator = config.generator()
        if self.generator is not None and config.noise_multiplier > 0:
            logger.warning(
                "noise seed %d: whoever knows it can regenerate the noise and subtract it; "
                "use a seed for tests and replays only",
                config.seed,
            )

    def __call__(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        return privatize(hidden, token_mask, self.config, self.generator)
