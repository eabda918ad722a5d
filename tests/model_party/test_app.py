"""The HTTP layer on valid requests: health, info, OpenAPI, wire dtypes, and a real server on loopback."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app_fixtures import ALICE, assert_a_valid_step_succeeds, step_for
from live_server import LiveServer
from splitprefix.model_party.app import create_app
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from splitprefix.wire.disclosure import HEAD_CLIENT_DISCLOSURE, HEAD_SERVER_DISCLOSURE
from splitprefix.wire.tensors import CONTENT_TYPE
from top_helpers import SPLIT_AT, assert_error, binary_headers, blob


def test_a_valid_step_round_trips(client, model, backend):
    assert_a_valid_step_succeeds(client, model, backend)


def test_health_needs_no_token(client):
    response = client.get(schemas.HEALTH_PATH)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_info_describes_the_top_and_says_what_each_head_mode_reveals(client, backend):
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
    assert info.warnings == [HEAD_SERVER_DISCLOSURE, HEAD_CLIENT_DISCLOSURE]
    assert info.max_client_layers == 0 and info.fingerprints.top_sha256 == {}
    assert info.protocol_version == schemas.PROTOCOL_VERSION


def test_what_each_head_mode_reveals_is_logged_at_startup(backend, caplog):
    with caplog.at_level(logging.WARNING):
        create_app(backend)
    assert HEAD_SERVER_DISCLOSURE in caplog.text and HEAD_CLIENT_DISCLOSURE in caplog.text


@pytest.mark.parametrize("head", ["server", "client", "both"])
def test_info_states_exactly_what_each_offered_head_mode_reveals(model_dir, head):
    # Prepare
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT, head=head))
    with TestClient(create_app(backend)) as client:
        # Execute
        info = client.get(schemas.INFO_PATH).json()

    # Assert: head=server gives the targets away; head=client keeps them off the wire only
    offered = ["server", "client"] if head == "both" else [head]
    assert list(info["head_disclosure"]) == offered and info["warnings"] == list(
        info["head_disclosure"].values()
    )
    if "server" in offered:
        text = info["head_disclosure"]["server"]
        assert "sends its target tokens to the model party in the clear" in text and "every label" in text
    if "client" in offered:
        text = info["head_disclosure"]["client"]
        assert "never cross the wire" in text and "not hidden from the model party" in text
        assert "invert the gradient dL/dh_L" in text and "final norm and LM head" in text


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
    step = step_for(model, backend, step_id=f"dtype-{wire_dtype}")
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
    step = step_for(model, backend, head="client")
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


@pytest.mark.parametrize("route", ["forward", "loss"])
def test_a_request_whose_client_is_gone_does_not_use_the_model(model_dir, model, route, caplog):
    # Prepare: the model is busy with another party's step, and we count the layers that run
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT))
    step = step_for(model, backend, head="client" if route == "forward" else "server")
    path = schemas.FORWARD_PATH if route == "forward" else schemas.LOSS_PATH
    ran = []
    backend.top.stack.layers[0].register_forward_pre_hook(lambda *_: ran.append(1))
    caplog.set_level(logging.INFO, logger="splitprefix.model_party.exchange")
    with LiveServer(create_app(backend)) as server:
        backend._lock.acquire()
        try:
            # Execute: the client gives up while its request waits for the model
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    server.url + path,
                    content=blob(step.tensors, step.meta),
                    headers=binary_headers(),
                    timeout=0.5,
                )
            time.sleep(0.3)  # the server notices the closed connection
        finally:
            backend._lock.release()
        deadline = time.monotonic() + 10
        while "disconnected" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        after = httpx.post(server.url + path, content=blob(step.tensors, step.meta), headers=binary_headers())

    # Assert: the dropped request never ran a layer; the next one is served
    assert "disconnected during" in caplog.text
    assert len(ran) == 1 and after.status_code == 200
