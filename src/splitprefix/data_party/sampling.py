"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Scores arrive either as full logits (B, V) or as the server's k best logits with their token ids,
best first. Sampling from the k best is exact for top-k sampling with that k; top-p over a
shortened list is exact only when the nucleus fits in it, so the client asks for full logits then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitprefix.errors import ConfigError


@dataclass(frozen=True)
class GenerationConfig:
    """What and how much to generate. The CLI, the gateway and the Python API share these fields."""

    max_new_tokens: int = 64
    """Most tokens generated per prompt."""
    do_sample: bool = False
    """False: greedy decoding (identical to the whole model's greedy `generate`). True: sample."""
    temperature: float = 1.0
    """Divides the logits before sampling; lower is more conservative."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 turns it off."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches top_p; 1.0 turns it off."""
    seed: int | None = None
    """Seed of the sampling generator: the same seed and prompts give the same text."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end a row's text; the text is cut before the first one."""
    stop_at_eos: bool = True
    """End a row at the model's end-of-sequence token."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling; got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"need top_k >= 0 and 0 < top_p <= 1; got top_k={self.top_k}, top_p={self.top_p}"
            )
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")

    @property
    def server_top_k(self) -> int:
        """How many logits per row the server needs to send: 1 for greedy, k for top-k alone, else all (0)."""
        if not self.do_sample:
            return 1
        return self.top_k if self.top_k and self.top_p >= 1.0 else 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The seeded sampling generator on `device` (where the scores are), or None when unseeded."""
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)


def next_tokens(
    scores: torch.Tensor,
    indices: torch.Tensor | None,
    config: GenerationConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Token ids (B,) from `scores` (B, V) or the k best (B, k) with their `indices` (B, k)."""
    if not config.do_sample:
        best = scores.argmax(dim=-1)  # (B,)
        return best if indices is None else indices.gather(1, best[:, None])[:, 0]
    scores = scores.float() / config.temperature
    if config.top_k and config.top_k < scores.shape[-1]:
        scores, picked = torch.topk(scores, config.top_k, dim=-1)  # (B, k) best first
        indices = picked if indices is None else indices.gather(1, picked)
    if config.top_p < 1.0:
        scores = _nucleus(scores, config.top_p)
    probs = torch.softmax(scores, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return (choice if indices is None else indices.gather(1, choice))[:, 0]


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scores` with -inf outside the smallest set of tokens whose probability reaches `top_p`."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # mass before this token already enough
    drop[:, 0] = False
    return scores.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
