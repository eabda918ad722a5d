"""A local federation's settings (`LocalFederation`): where its parties' data and its model party
come from. Apart from `federation.local`, which runs it, so that the command line reads these
fields without importing Flower."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitprefix.errors import ConfigError


@dataclass(frozen=True)
class LocalFederation:
    """Where the parties' data and the model party come from, for a local run."""

    emulator_dir: str
    """The emulator every party (and the operator's evaluation) runs."""
    data_files: tuple[str, ...]
    """A party's training JSONL, one per party, or a single file to cut into `parties` parts."""
    out_dir: str
    """Folder for the joint prefix (out/prefix), rounds.jsonl, results.json and the parties' files."""
    parties: int | None = None
    """Number of parties when one file is cut; unset = one party per file."""
    alpha: float = 100.0
    """Label skew of the cut (Dirichlet over labels): 0.1 = non-IID, 100 = about IID."""
    model: str | None = None
    """Full model to serve in a child process on loopback (or 'builtin'); unset = use `server_url`."""
    server_url: str | None = None
    """URL of a running `splitprefix serve`; unset = start one from `model`."""
    token: str | None = None
    """Bearer token for `server_url`, used by every party and the operator."""
    party_cpus: float = 1.0
    """CPUs the simulation reserves per simulated party (how many train at once)."""
    flower: dict[str, bool | float | int | str] = field(default_factory=dict)
    """Run config for both apps (kebab-case: num-rounds, local-steps, secure, ...)."""

    def __post_init__(self) -> None:
        if (self.model is None) == (self.server_url is None):
            raise ConfigError("give exactly one of model (start a server) and server_url (use one)")
        if not self.data_files:
            raise ConfigError("give at least one data file")
        if len(self.data_files) > 1 and self.parties not in (None, len(self.data_files)):
            raise ConfigError(f"{len(self.data_files)} data files but parties={self.parties}")
        if self.num_parties < 1:
            raise ConfigError(f"a federation needs at least one party; got {self.num_parties}")

    @property
    def num_parties(self) -> int:
        return self.parties if len(self.data_files) == 1 and self.parties else len(self.data_files)
