"""Shared by the generation-session tests: open and step requests, and opening a session."""

from __future__ import annotations

import torch

from app_fixtures import ALICE
from splitprefix.wire import schemas
from splitprefix.wire.tensors import decode
from top_helpers import SPLIT_AT, binary_headers, blob

BATCH, PROMPT, PREFIX = 2, 4, 3


def open_request(backend, head="server", max_length=PREFIX + PROMPT + 4, top_k=1, batch=BATCH):
    d = backend.dims
    tensors = {
        "hidden": torch.randn(batch, PROMPT, d.hidden_size),
        "token_mask": torch.ones(batch, PROMPT, dtype=torch.long),
        "positions": torch.arange(PREFIX, PREFIX + PROMPT).repeat(batch, 1),
        "prefix_kv": torch.randn(d.num_layers - SPLIT_AT, 2, d.num_kv_heads, PREFIX, d.head_dim),
    }
    meta = {
        "protocol_version": schemas.PROTOCOL_VERSION,
        "step_id": "open",
        "head": head,
        "wire_dtype": "fp32",
        "split_at": SPLIT_AT,
        "bottom_sha256": backend.top.bottom_sha256,
        "max_length": max_length,
        "top_k": top_k if head == "server" else 0,
    }
    return tensors, meta


def step_request(backend, head="server", batch=BATCH, position=PREFIX + PROMPT, step_id="1"):
    tensors = {
        "hidden": torch.randn(batch, 1, backend.dims.hidden_size),
        "token_mask": torch.ones(batch, 1, dtype=torch.long),
        "positions": torch.full((batch, 1), position),
    }
    meta = {
        "protocol_version": schemas.PROTOCOL_VERSION,
        "step_id": step_id,
        "head": head,
        "wire_dtype": "fp32",
    }
    return tensors, meta


def post(client, path, request, token=ALICE):
    return client.post(path, content=blob(*request), headers=binary_headers(token))


def open_session(client, backend, token=ALICE, **kwargs):
    response = post(client, schemas.SESSIONS_PATH, open_request(backend, **kwargs), token)
    assert response.status_code == 200, response.text
    tensors, reply = decode(response.content)
    return reply["session_id"], tensors, reply


def step_path(session_id):
    return schemas.SESSION_STEP_PATH.format(session_id=session_id)
