"""Fixtures shared by the HTTP-layer tests of the model party's app (loaded by tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from splitprefix.model.loading import load_causal_lm
from splitprefix.model_party.app import create_app
from splitprefix.model_party.auth import TokenAuth
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from splitprefix.wire.tensors import CONTENT_TYPE, decode
from top_helpers import SPLIT_AT, binary_headers, blob, local_step, save_model_dir

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789abcd"
LIMITS = dict(max_request_bytes=100_000, max_batch_size=4, max_tokens=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def model(model_dir):
    return load_causal_lm(model_dir)


@pytest.fixture(scope="module")
def backend(model_dir):
    return TopBackend(ServerSettings(model_dir, SPLIT_AT, head="both", **LIMITS))


@pytest.fixture(scope="module")
def client(backend):
    app = create_app(backend, TokenAuth({"alice": ALICE, "bob": BOB}))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def step_for(model, backend, head="client", step_id="step-1", **kwargs):
    return local_step(model, head, backend.top.bottom_sha256, step_id=step_id, **kwargs)


def post(client, path, tensors, meta, token=ALICE):
    return client.post(path, content=blob(tensors, meta), headers=binary_headers(token))


def assert_a_valid_step_succeeds(client, model, backend, step_id="valid"):
    """Forward and backward of a fresh step, as the server must still serve after any mistake."""
    step = step_for(model, backend, step_id=step_id)
    forward = post(client, schemas.FORWARD_PATH, step.tensors, step.meta)
    assert forward.status_code == 200, forward.text
    assert forward.headers["content-type"] == CONTENT_TYPE
    output, reply = decode(forward.content)
    assert reply["graph_held"] is True
    grad = {schemas.GRAD_OUTPUT: torch.ones_like(output[schemas.OUTPUT])}
    backward = post(client, schemas.BACKWARD_PATH, grad, step.meta)
    assert backward.status_code == 200, backward.text
    grads, _ = decode(backward.content)
    assert set(grads) == {schemas.GRAD_HIDDEN, schemas.GRAD_PREFIX}
