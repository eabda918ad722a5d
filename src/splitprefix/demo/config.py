"""The demo's settings: one dataclass, with a full and a quick preset sized for 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass, replace

from splitprefix.errors import ConfigError


@dataclass(frozen=True)
class DemoConfig:
    """Everything that sizes a demo run; saved in `results.json`."""

    out_dir: str = "demo"
    """Folder that receives report.md, report.html, the PNG plots and results.json."""
    parties: int = 3
    """Data parties, each holding a label-skewed share of the synthetic task."""
    model: str = "builtin"
    """The model party's full model."""
    split_at: int = 2
    """K: the data parties run the embeddings and layers [0, K)."""
    keep: int = 2
    """Upper layers the emulator keeps (uniform layer drop)."""
    alpha: float = 0.3
    """Dirichlet label skew of the parties' shares: small = non-IID."""
    n_train: int = 1200
    """Training examples of the synthetic task, cut among the parties."""
    n_test: int = 100
    """Held-out examples (compositions and slot fillers unseen in training)."""
    prefix_len: int = 16
    """Virtual tokens per layer."""
    batch_size: int = 8
    """Examples per optimiser step, in every stage."""
    lr: float = 0.1
    """Peak AdamW learning rate, in every stage."""
    offsite_steps: int = 150
    """Steps of each party's offsite training on the emulator."""
    rounds: int = 6
    """Federation rounds."""
    local_steps: int = 10
    """Steps per party per round; the single party trains rounds x local_steps through the split."""
    generation_prompts: int = 10
    """Answers shown in the report (the first right and wrong ones; every held-out prompt is generated
    through the split and counted), and the batch of the tokens/s measurement."""
    speed_new_tokens: int = 32
    """New tokens per row in the tokens/s measurement."""
    speed_reps: int = 3
    """Timed generations per side (split, whole) and batch size; the median counts."""
    seed: int = 0
    """Seed of the task, the cut, the prefixes and the data order."""
    quick: bool = False
    """Whether this is the `--quick` preset (recorded in the report)."""

    def __post_init__(self) -> None:
        if self.parties < 1:
            raise ConfigError(f"parties must be >= 1; got {self.parties}")
        if self.n_train < 10 * self.parties:
            raise ConfigError(f"n_train {self.n_train} is too small for {self.parties} parties")
        if min(self.n_test, self.offsite_steps, self.rounds, self.local_steps) < 1:
            raise ConfigError(
                "n_test, offsite_steps, rounds and local_steps must be >= 1; got "
                f"{self.n_test}, {self.offsite_steps}, {self.rounds}, {self.local_steps}"
            )
        if min(self.generation_prompts, self.speed_new_tokens, self.speed_reps) < 1:
            raise ConfigError("generation_prompts, speed_new_tokens and speed_reps must be >= 1")

    @property
    def single_steps(self) -> int:
        """Split steps of the single party: what one party spends in the federation."""
        return self.rounds * self.local_steps

    @property
    def central_steps(self) -> int:
        """Whole-model steps of the centralized reference: the federation's total."""
        return self.parties * self.rounds * self.local_steps

    @classmethod
    def preset(cls, out_dir: str, parties: int = 3, quick: bool = False) -> DemoConfig:
        """The full run (about 10 minutes on 2 cores) or `quick` (about 2 minutes)."""
        config = cls(out_dir=out_dir, parties=parties)
        if not quick:
            return config
        return replace(
            config,
            quick=True,
            n_train=300,
            n_test=30,
            offsite_steps=30,
            rounds=2,
            local_steps=5,
            generation_prompts=6,
            speed_new_tokens=8,
            speed_reps=1,
        )
