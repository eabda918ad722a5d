"""The split-training protocol: version, endpoint paths, message fields and JSON schemas.

Binary messages (forward and backward) are safetensors blobs (see `wire.tensors`). Their metadata
always carries `protocol_version`, `step_id`, `head` and `wire_dtype`; forward requests also carry
`split_at` and `bottom_sha256` so the server can refuse a data party whose bottom is not its model's.

Training with head=client takes two round trips per step, a forward and a backward:
Forward request tensors (`FORWARD_PATH`):
    hidden          (B, T, d)                 layer-K hidden states (clipped, noised and zero on
                                              padding when the data party's privacy option is on)
    attention_mask  (B, P + T)                1 for the P prefix keys and every real token
    positions       (B, T)                    position ids of the tokens
    prefix_kv       (L - K, 2, n_kv, P, hd)   the data party's prefix for the server's layers
Forward response tensors:
    output          (B, T, d) last hidden states (before the final norm); metadata `graph_held`
                    says whether the server keeps the graph for the backward
Backward request tensors (`BACKWARD_PATH`):
    grad_output     same shape as `output`
    + every forward request tensor, when the client asks the server to recompute (stateless path,
      or `graph_held` was false)
Backward response tensors:
    grad_hidden     (B, T, d)
    grad_prefix_kv  (L - K, 2, n_kv, P, hd)

The U-shaped split (head=client only): forward and backward metadata also carry `client_layers` M
(default 0) and, when M > 0, `top_sha256` (the fingerprint of the data party's last M layers). The
server then runs layers [K, L - M) only: `prefix_kv` is (L - M - K, 2, n_kv, P, hd), `output` the
hidden states after layer L - M, and the grad_output that comes back is dL/dh_{L-M}. `/v1/info`
says the largest M allowed (`max_client_layers`) and each allowed M's top fingerprint.

Training with head=server takes one round trip per step (`LOSS_PATH`). The targets are exposed to
the model party in this mode anyway, so the data party sends them and the server computes the
cross-entropy itself: nothing of size V crosses the wire.
Loss request tensors: the forward request's four, plus
    targets         (B, T)                    the next token each position must predict, or -100
                                              where the position is not supervised
    metadata        as a forward, plus `grad` (default true): false asks for the loss alone
Loss response tensors:
    loss_sum        ()                        summed cross-entropy over the supervised positions
                                              (metadata `n_tokens` counts them)
    grad_hidden, grad_prefix_kv               d loss_sum / d inputs, when `grad` is true

If the server no longer holds the forward's graph and the backward carries no forward inputs, it
answers 409 with code `graph_missing`; the client then resends the backward with the inputs.

Generation (split inference) keeps a session per batch of prompts: the KV cache of layers [K, L).
Open request (`POST SESSIONS_PATH`), the prefill:
    hidden          (B, T, d)                 layer-K hidden states of the left-padded prompts
    token_mask      (B, T)                    1 for real tokens, 0 for padding
    positions       (B, T)                    position ids of the tokens
    prefix_kv       (L - K, 2, n_kv, P, hd)   seeds the session's cache once (P may be 0)
    metadata        as a training forward, plus `max_length` (P + every token the session will hold)
                    and `top_k` (head=server: 0 = full logits, k > 0 = the k best only)
Step request (`POST SESSION_STEP_PATH`): hidden, token_mask and positions of the new tokens; or
hidden (B, 1, d) alone for one real token per row at the position after each row's last (the usual
decoding step, which saves two tensors per token); metadata protocol_version, step_id, head, wire_dtype.
Open and step responses, at the last position of every row (which left padding keeps real):
    head=server, top_k = 0:  logits (B, V)
    head=server, top_k > 0:  top_values (B, k), top_indices (B, k), best first
    head=client:             last_hidden (B, d), before the final norm
    client_layers M > 0:     output (B, T, d), after layer L - M, at every new position (the data
                             party's top layers need them all); the open's prefix_kv is then
                             (L - M - K, 2, n_kv, P, hd)
    metadata                 session_id, step_id, length (keys now cached, prefix included)
A session belongs to the bearer token that opened it; an unknown, expired or foreign session
answers 404 `session_missing`, and the client then opens a new one with everything so far.
Steps may also travel over a WebSocket (`SESSION_STREAM_PATH`, when /v1/info says
`generation_stream`): one binary message per step, the HTTP step's request body, answered by the
HTTP step's answer body, or by a text message holding JSON `StreamError` with the status and code
that the HTTP route would give. See `model_party.stream` for the upgrade and the close codes.
A full server answers 429 `too_many_sessions` (this party's share) or 503 `server_full`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from splitprefix.wire.disclosure import HEAD_CLIENT_DISCLOSURE, HEAD_SERVER_DISCLOSURE

PROTOCOL_VERSION = 2
"""2: head=server trains through `LOSS_PATH` (the server computes the loss); 1 sent (N, V) logits."""
HEALTH_PATH = "/v1/health"
INFO_PATH = "/v1/info"
FORWARD_PATH = "/v1/train/forward"
BACKWARD_PATH = "/v1/train/backward"
LOSS_PATH = "/v1/train/loss"

SESSIONS_PATH = "/v1/generate/sessions"
SESSION_PATH = "/v1/generate/sessions/{session_id}"
SESSION_STEP_PATH = "/v1/generate/sessions/{session_id}/step"
SESSION_STREAM_PATH = "/v1/generate/sessions/{session_id}/stream"
STREAM_IDLE_CLOSE = 4408
"""WebSocket close code: no step came for the session's idle time (`session_ttl_s`)."""

FORWARD_INPUTS = ("hidden", "attention_mask", "positions", "prefix_kv")
TARGETS = "targets"
LOSS_SUM = "loss_sum"
IGNORE_TARGET = -100
"""A `targets` entry that marks a position without a loss."""
OUTPUT = "output"
GRAD_OUTPUT = "grad_output"
GRAD_HIDDEN = "grad_hidden"
GRAD_PREFIX = "grad_prefix_kv"
GRAPH_MISSING = "graph_missing"
GENERATE_INPUTS = ("hidden", "token_mask", "positions")
PREFIX_KV = "prefix_kv"
LOGITS = "logits"
TOP_VALUES = "top_values"
TOP_INDICES = "top_indices"
LAST_HIDDEN = "last_hidden"
SESSION_MISSING = "session_missing"

HeadMode = Literal["server", "client"]

HEAD_SERVER_WARNING = HEAD_SERVER_DISCLOSURE  # what head=server reveals (wire.disclosure)
HEAD_CLIENT_WARNING = HEAD_CLIENT_DISCLOSURE  # what head=client reveals, the U-split included


class Fingerprints(BaseModel):
    """Hashes that tie a data party's bottom part to this model."""

    base_config_sha256: str
    tokenizer_sha256: str
    bottom_sha256: str
    top_sha256: dict[str, str] = Field(
        default_factory=dict,
        description="For each M in 1..max_client_layers (as a string), the fingerprint of the last M layers.",
    )


class PrefixLayout(BaseModel):
    """Shape of the prefix a data party sends for the server's layers."""

    layers: list[int] = Field(description="Original layer indices [K, L) the server runs.")
    num_kv_heads: int
    head_dim: int
    shape: str = Field(description="(L - K, 2, num_kv_heads, P, head_dim)")
    layers_kv: list[list[int]] | None = Field(
        None,
        description="Per layer of the whole model, (kv heads, key width, value width) where some layer caches "
        "less than (num_kv_heads, head_dim, head_dim); the rest of the tensor is zero padding. None when none does.",
    )


class Limits(BaseModel):
    """Request limits the server enforces."""

    max_request_bytes: int
    max_batch_size: int
    max_tokens: int = Field(description="Upper bound on P + T per sequence.")
    max_sessions: int = Field(0, description="Generation sessions held at once, all parties together.")
    max_sessions_per_client: int = Field(0, description="Generation sessions one data party may hold.")
    max_session_bytes: int = Field(0, description="Memory the sessions' KV caches may reserve together.")
    session_ttl_s: float = Field(0.0, description="Idle seconds after which a session is dropped.")
    max_requests_per_client: int = Field(0, description="Requests one data party may have in flight.")
    max_streams_per_client: int = Field(0, description="Generation WebSockets one data party may hold.")
    max_streams_per_session: int = Field(0, description="Generation WebSockets open on one session.")


class ModelInfo(BaseModel):
    """What a data party needs to know before it trains against this server."""

    protocol_version: int
    architecture: str
    num_layers: int
    split_at: int
    hidden_size: int
    vocab_size: int
    head_modes: list[HeadMode]
    prefix: PrefixLayout
    fingerprints: Fingerprints
    limits: Limits
    wire_dtypes: list[str]
    warnings: list[str]
    head_disclosure: dict[HeadMode, str] = Field(
        default_factory=dict, description="What each offered head mode reveals to this model party."
    )
    max_client_layers: int = Field(
        0,
        description="Largest M a data party may keep at its end (U-shaped split, head=client): the server then "
        "runs [K, L - M) and returns h_{L-M}. 0 = not offered.",
    )
    generation_stream: bool = Field(
        default=False, description="Generation steps may travel over a WebSocket at SESSION_STREAM_PATH."
    )


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a machine-readable code and a message that says what to do."""

    code: str
    detail: str


class StreamError(ErrorBody):
    """A step refused on a generation stream: the HTTP route's status, code and detail."""

    status: int
    retry_after_s: float | None = Field(
        default=None,
        description="The HTTP route's Retry-After: seconds to wait before sending the step again.",
    )
