"""Settings of the model party's split-training server, shared by the CLI, the Python API and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from splitprefix.errors import ConfigError
from splitprefix.exposure import is_loopback

HeadSetting = Literal["server", "client", "both"]
ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]
MiB = 1024 * 1024


@dataclass
class ServerSettings:
    """What the server loads, where it listens and the limits it enforces on every request."""

    model_dir: str | Path
    """Full model directory written by `save_pretrained`, or 'builtin' for the shipped model."""
    split_at: int
    """K: the data party runs layers [0, K); this server runs layers [K, L)."""
    head: HeadSetting = "both"
    """Head modes offered: server (targets sent in clear), client (targets off the wire, still recoverable
    by this server from the gradients), or both; what each reveals: `wire.disclosure` and /v1/info."""
    host: str = "127.0.0.1"
    """Interface to bind, loopback by default; any other needs `tokens_file` (or `insecure`) and should
    have TLS."""
    port: int = 8000
    """TCP port to listen on (0 lets the OS choose)."""
    tokens_file: Path | None = None
    """Bearer tokens per data party: JSON {name: token} or 'name token' lines (`model_party.auth`);
    none turns authentication off."""
    insecure: bool = False
    """Allow a non-loopback host without a tokens file: anyone who reaches it may use the model."""
    tls_cert: Path | None = None
    """PEM certificate for HTTPS; give it together with `tls_key`."""
    tls_key: Path | None = None
    """PEM private key for HTTPS; give it together with `tls_cert`."""
    max_request_bytes: int = 256 * MiB
    """Largest request body accepted, in bytes (413 beyond)."""
    max_batch_size: int = 64
    """Largest batch B accepted in one request."""
    max_tokens: int = 4096
    """Largest P + T (prefix plus tokens) per sequence."""
    graph_ttl_s: float = 120.0
    """Seconds a held forward graph waits for its backward before it is dropped."""
    max_graph_bytes: int = 2048 * MiB
    """Memory cap for all held graphs together; the oldest are dropped beyond it."""
    max_graphs_per_client: int = 8
    """Held graphs per data party; its oldest is dropped beyond it."""
    session_ttl_s: float = 300.0
    """Seconds a generation session may stay idle before its KV cache is dropped."""
    max_sessions: int = 64
    """Generation sessions held at once, all data parties together (503 beyond)."""
    max_sessions_per_client: int = 8
    """Generation sessions one data party may hold at once (429 beyond)."""
    max_session_bytes: int = 1024 * MiB
    """Memory reserved by all sessions' KV caches together (503 beyond)."""
    max_requests_per_client: int = 4
    """Requests one data party may have in flight at once, body upload included (429 beyond)."""
    max_streams_per_session: int = 2
    """Generation WebSockets open at once on one session (429 beyond); 2 lets a client reconnect."""
    max_streams_per_client: int = 8
    """Generation WebSockets one data party may hold open at once (429 beyond)."""
    max_connections: int = 128
    """Connections and requests the server serves at once, all parties together (503 beyond)."""
    max_merged_rows: int = 64
    """Most rows of one merged generation forward, all sessions of all parties together."""
    max_merged_keys: int = 65536
    """Most rows x keys per row (prefix, past and new tokens, padded to the longest row) of one merged
    generation forward: bounds the padded cache it builds."""
    threads: int = 0
    """CPU threads of torch's operators in `serve` (0 = torch's default, one per core). Give 1 when
    data parties share the server's cores."""
    device: str = "cpu"
    """Torch device that runs the top ('cpu', 'cuda', 'cuda:1', ...)."""
    dtype: ComputeDtype = "auto"
    """Compute dtype of the top's weights and activations; 'auto' is the checkpoint's own dtype."""
    max_client_layers: int = 0
    """Largest M a data party may keep at its end (the U-shaped split, head=client): this server then
    runs layers [K, L - M) for it; 0 = every request runs [K, L). Ship those layers with
    `emulate --client-layers M`."""

    def __post_init__(self) -> None:
        if not isinstance(self.split_at, int) or self.split_at < 1:
            raise ConfigError(f"split_at must satisfy 1 <= K < L (the layer count); got K={self.split_at!r}")
        if self.head not in ("server", "client", "both"):
            raise ConfigError(f"head must be 'server', 'client' or 'both'; got {self.head!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535]; got {self.port}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype must be 'auto', 'fp32', 'bf16' or 'fp16'; got {self.dtype!r}")
        for name in (
            "max_request_bytes",
            "max_batch_size",
            "max_tokens",
            "max_graphs_per_client",
            "max_sessions",
            "max_sessions_per_client",
            "max_requests_per_client",
            "max_streams_per_session",
            "max_streams_per_client",
            "max_connections",
            "max_merged_rows",
            "max_merged_keys",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"threads must be an integer >= 0; got {self.threads!r}")
        if not isinstance(self.max_client_layers, int) or self.max_client_layers < 0:
            raise ConfigError(f"max_client_layers must be an integer >= 0; got {self.max_client_layers!r}")
        if self.max_client_layers and self.head == "server":
            raise ConfigError(
                "max_client_layers > 0 needs head=client or both: the U-split keeps the head at the party"
            )
        if self.max_session_bytes < 0 or self.session_ttl_s <= 0:
            raise ConfigError(
                "max_session_bytes must be >= 0 and session_ttl_s > 0; got "
                f"{self.max_session_bytes}, {self.session_ttl_s}"
            )
        if self.max_graph_bytes < 0 or self.graph_ttl_s <= 0:
            raise ConfigError(
                f"max_graph_bytes must be >= 0 and graph_ttl_s > 0; got {self.max_graph_bytes}, {self.graph_ttl_s}"
            )
        self._check_files()

    def _check_files(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                f"give both tls_cert and tls_key, or neither; got cert={self.tls_cert}, key={self.tls_key}"
            )
        for name in ("tokens_file", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name} {path} does not exist or is not a file")

    @property
    def head_modes(self) -> list[Literal["server", "client"]]:
        """The head placements a data party may ask for."""
        return ["server", "client"] if self.head == "both" else [self.head]

    @property
    def loopback(self) -> bool:
        """Whether the server only listens on this machine."""
        return is_loopback(self.host)
