"""The HTTP layer on valid requests: health, info, OpenAPI, wire dtypes, and a real server on loopback."""

from __future__ import annotations

import logging

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from live_server import LiveServer
from splitprefix.model.loading import load_causal_lm
from splitprefix.model_party.app import create_app
from splitprefix.model_party.auth import TokenAuth
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from splitprefix.wire.tensors import CONTENT_TYPE, decode
from top_helpers import SPLIT_AT, assert_error, binary_headers, blob, local_step, save_model_dir

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


def _step(model, backend, head="server", step_id="step-1", **kwargs):
    return local_step(model, head, backend.top.bottom_sha256, step_id=step_id, **kwargs)


def _post(client, path, tensors, meta, token=ALICE):
    return client.post(path, content=blob(tensors, meta), headers=binary_headers(token))


def _assert_a_valid_step_succeeds(client, model, backend, step_id="valid"):
    """Forward and backward of a fresh step, as the server must still serve after any mistake."""
    step = _step(model, backend, step_id=step_id)
    forward = _post(client, schemas.FORWARD_PATH, step.tensors, step.meta)
    assert forward.status_code == 200, forward.text
    assert forward.headers["content-type"] == CONTENT_TYPE
    output, reply = decode(forward.content)
    assert reply["graph_held"] is True
    grad = {schemas.GRAD_OUTPUT: torch.ones_like(output[schemas.OUTPUT])}
    backward = _post(client, schemas.BACKWARD_PATH, grad, step.meta)
    assert backward.status_code == 200, backward.text
    grads, _ = decode(backward.content)
    assert set(grads) == {schemas.GRAD_HIDDEN, schemas.GRAD_PREFIX}


def test_a_valid_step_round_trips(client, model, backend):
    _assert_a_valid_step_succeeds(client, model, backend)


def test_health_needs_no_token(client):
    response = client.get(schemas.HEALTH_PATH)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_info_describes_the_top_and_warns_about_head_server(client, backend):
    # Execute
    info = schemas.ModelInfo.model_validate(
        client.get(schemas.INFO_PATH, headers=binary_headers(ALICE)).json()
    )

    # Assert
    assert (info.architecture, info.num_layers, info.split_at, info.hidden_size) == ("llama", 4, 2, 64)
    assert info.prefix.layers == [2, 3] and info.prefix.shape == "(2, 2, 2, P, 16)"
    assert info.fingerprints.bottom_sha256 == backend.top.bottom_sha256
    assert info.limits.max_batch_size == 4 and info.limits.max_request_bytes == 100_000
    assert sorted(info.head_modes) == ["client", "server"]
    assert info.warnings == [schemas.HEAD_SERVER_WARNING]
    assert info.protocol_version == schemas.PROTOCOL_VERSION


def test_the_head_server_warning_is_logged_at_startup(backend, caplog):
    with caplog.at_level(logging.WARNING):
        create_app(backend)
    assert schemas.HEAD_SERVER_WARNING in caplog.text


def test_the_openapi_schema_documents_the_binary_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (schemas.FORWARD_PATH, schemas.BACKWARD_PATH):
        post = paths[path]["post"]
        assert CONTENT_TYPE in post["requestBody"]["content"]
        assert CONTENT_TYPE in post["responses"]["200"]["content"]
        assert {"401", "409", "413", "422"} <= set(post["responses"])
    assert {schemas.HEALTH_PATH, schemas.INFO_PATH} <= set(paths)


@pytest.mark.parametrize("wire_dtype", ["bf16", "fp16"])
def test_the_reply_uses_the_wire_dtype_the_client_chose(client, model, backend, wire_dtype):
    step = _step(model, backend, step_id=f"dtype-{wire_dtype}")
    body = blob(step.tensors, step.meta | {"wire_dtype": wire_dtype}, wire_dtype)
    response = client.post(schemas.FORWARD_PATH, content=body, headers=binary_headers(ALICE))
    header_dtypes = {str(t.dtype) for t in _raw_tensors(response.content).values()}
    assert response.status_code == 200 and header_dtypes == {
        "torch." + {"bf16": "bfloat16", "fp16": "float16"}[wire_dtype]
    }


def _raw_tensors(content):
    from safetensors.torch import load

    return load(content)


def test_a_real_server_on_loopback_serves_and_restarts(model_dir, model):
    # Prepare
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT))
    step = _step(model, backend, head="client")
    headers = binary_headers()
    with LiveServer(create_app(backend)) as server:
        # Execute: forward, a restart with a fresh server (held graphs are lost), backward
        forward = httpx.post(
            server.url + schemas.FORWARD_PATH, content=blob(step.tensors, step.meta), headers=headers
        )
        server.restart(app=create_app(TopBackend(ServerSettings(model_dir, SPLIT_AT))))
        grad = blob({"grad_output": torch.ones(3, 7, 64)}, step.meta)
        lost = httpx.post(server.url + schemas.BACKWARD_PATH, content=grad, headers=headers)
        resent = blob({"grad_output": torch.ones(3, 7, 64)} | step.tensors, step.meta)
        recomputed = httpx.post(server.url + schemas.BACKWARD_PATH, content=resent, headers=headers)

    # Assert
    assert forward.status_code == 200
    assert_error(lost, 409, "graph_missing", "resend this backward")
    assert recomputed.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + schemas.HEALTH_PATH)
