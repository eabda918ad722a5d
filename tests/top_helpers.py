"""Shared by the model-party tests: saved tiny models, and one data-party step computed locally."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from conftest import TOKENIZER_VOCAB, build_tiny_model, build_tiny_tokenizer, random_batch
from splitprefix.model.prefix import PrefixConfig, prefix_cache
from splitprefix.model.split import extend_mask, split_model, token_positions
from splitprefix.wire import schemas
from splitprefix.wire.tensors import CONTENT_TYPE, encode

SPLIT_AT = 2
PREFIX_LEN = 3
# The server runs the same ops in the same order as the whole model.
EXACT = dict(atol=1e-6, rtol=1e-5)
GRADS = dict(atol=1e-5, rtol=1e-4)


def save_model_dir(directory: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random model and the tiny tokenizer, saved as the model party would ship them."""
    build_tiny_model(arch, seed=seed, vocab_size=TOKENIZER_VOCAB).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


@dataclass
class LocalStep:
    """One training step's data-party side: its inputs, and the request the server should get."""

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) token mask
    kv: torch.Tensor  # (L, 2, n_kv, P, hd) the whole prefix
    tensors: dict[str, torch.Tensor]  # the forward request's tensors
    meta: dict[str, Any]  # the forward request's metadata


def local_step(
    model: PreTrainedModel,
    head: str,
    bottom_sha256: str,
    padding: str | None = None,
    prefix_len: int = PREFIX_LEN,
    step_id: str = "step-1",
    batch: int = 3,
    seed: int = 1,
) -> LocalStep:
    """Run the bottom [0, K) locally and build the forward request for the server."""
    ids, mask = random_batch(batch=batch, padding=padding, seed=seed)
    shape = PrefixConfig.for_model(model.config, max(prefix_len, 1)).kv_shape
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[:, :, :, :prefix_len]
    bottom = split_model(model, SPLIT_AT).bottom
    cache = prefix_cache(kv[:SPLIT_AT], model.config, batch) if prefix_len else None
    with torch.no_grad():
        x = bottom(ids, extend_mask(mask, prefix_len), token_positions(mask, prefix_len), cache)
    tensors = {
        "hidden": x.hidden,
        "attention_mask": x.attention_mask,
        "positions": x.positions,
        "prefix_kv": kv[SPLIT_AT:].contiguous(),
    }
    if head == "server":
        tensors[schemas.TARGETS] = next_targets(ids, mask)
    meta = {
        "protocol_version": schemas.PROTOCOL_VERSION,
        "step_id": step_id,
        "head": head,
        "wire_dtype": "fp32",
        "split_at": SPLIT_AT,
        "bottom_sha256": bottom_sha256,
    }
    return LocalStep(ids, mask, kv, tensors, meta)


def next_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each real position's next real token, -100 at the last one and on padding."""
    targets = torch.full_like(ids, schemas.IGNORE_TARGET)
    follows = mask[:, :-1].bool() & mask[:, 1:].bool()
    targets[:, :-1][follows] = ids[:, 1:][follows]
    return targets


def blob(tensors: dict[str, torch.Tensor], meta: dict[str, Any], dtype: str = "fp32") -> bytes:
    return encode(tensors, meta, dtype)  # type: ignore[arg-type]


def binary_headers(token: str | None = None) -> dict[str, str]:
    headers = {"content-type": CONTENT_TYPE}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return headers


def assert_error(response: Any, status: int, code: str, pattern: str) -> None:
    """The answer is `status` with an ErrorBody of `code` whose detail matches `pattern`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "detail"} and body["code"] == code, body
    assert re.search(pattern, body["detail"]), body["detail"]
