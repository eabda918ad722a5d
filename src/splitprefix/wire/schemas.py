"""The split-training protocol: version, endpoint paths, message fields and JSON schemas.

Binary messages (forward and backward) are safetensors blobs (see `wire.tensors`). Their metadata
always carries `protocol_version`, `step_id`, `head` and `wire_dtype`; forward requests also carry
`split_at` and `bottom_sha256` so the server can refuse a data party whose bottom is not its model's.

Forward request tensors:
    hidden          (B, T, d)                 layer-K hidden states (clipped, noised and zero on
                                              padding when the data party's privacy option is on)
    attention_mask  (B, P + T)                1 for the P prefix keys and every real token
    positions       (B, T)                    position ids of the tokens
    prefix_kv       (L - K, 2, n_kv, P, hd)   the data party's prefix for the server's layers
    supervised      (B, T)                    head=server only: 1 where logits are wanted
Forward response tensors:
    output          head=client: (B, T, d) last hidden states (before the final norm)
                    head=server: (N, V) logits at the N supervised positions, row-major order
Backward request tensors:
    grad_output     same shape as `output`
    + every forward request tensor, when the client asks the server to recompute (stateless path)
Backward response tensors:
    grad_hidden     (B, T, d)
    grad_prefix_kv  (L - K, 2, n_kv, P, hd)

If the server no longer holds the forward's graph and the backward carries no forward inputs, it
answers 409 with code `graph_missing`; the client then resends the backward with the inputs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

PROTOCOL_VERSION = 1
HEALTH_PATH = "/v1/health"
INFO_PATH = "/v1/info"
FORWARD_PATH = "/v1/train/forward"
BACKWARD_PATH = "/v1/train/backward"

FORWARD_INPUTS = ("hidden", "attention_mask", "positions", "prefix_kv")
SUPERVISED = "supervised"
OUTPUT = "output"
GRAD_OUTPUT = "grad_output"
GRAD_HIDDEN = "grad_hidden"
GRAD_PREFIX = "grad_prefix_kv"
GRAPH_MISSING = "graph_missing"

HeadMode = Literal["server", "client"]

HEAD_SERVER_WARNING = (
    "head=server: the model party computes the logits and receives their gradients, which reveal the "
    "data party's target tokens. Use head=client to keep labels at the data party."
)


class Fingerprints(BaseModel):
    """Hashes that tie a data party's bottom part to this model."""

    base_config_sha256: str
    tokenizer_sha256: str
    bottom_sha256: str


class PrefixLayout(BaseModel):
    """Shape of the prefix a data party sends for the server's layers."""

    layers: list[int] = Field(description="Original layer indices [K, L) the server runs.")
    num_kv_heads: int
    head_dim: int
    shape: str = Field(description="(L - K, 2, num_kv_heads, P, head_dim)")


class Limits(BaseModel):
    """Request limits the server enforces."""

    max_request_bytes: int
    max_batch_size: int
    max_tokens: int = Field(description="Upper bound on P + T per sequence.")


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


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a machine-readable code and a message that says what to do."""

    code: str
    detail: str
