"""A message with the wrong tensor names, dtypes or shapes is refused from its safetensors header,
before a byte of its tensors is decoded: each test counts the server's decodes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from app_fixtures import ALICE, assert_a_valid_step_succeeds, step_for
from session_helpers import open_request, open_session, step_path, step_request
from splitprefix.wire import schemas, tensors
from splitprefix.wire.tensors import META_KEY
from top_helpers import assert_error, binary_headers, blob


@pytest.fixture
def decodes(monkeypatch):
    """How many messages the server has decoded (safetensors' load) since the test began."""
    calls = []
    real = tensors.st_load

    def counting(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(tensors, "st_load", counting)
    return calls


def _raw(named, meta):
    """A blob holding `named` tensors as they are (any dtype), with splitprefix metadata."""
    return st_save(named, metadata={META_KEY: json.dumps(meta)})


FORWARD_CASES = {
    # the body fits max_request_bytes; what it declares does not fit the model
    "wrong-width": (
        lambda t: t | {"hidden": torch.zeros(3, 7, 32, dtype=torch.bfloat16)},
        422,
        "bad_tensor",
        r"hidden must have shape \(B, T, 64\) with B, T >= 1; got \(3, 7, 32\)",
    ),
    "extra-tensor": (
        lambda t: t | {"junk": torch.zeros(40, 512, dtype=torch.float16)},
        422,
        "bad_tensor",
        r"unexpected \['junk'\]",
    ),
    "fp64": (lambda t: t | {"hidden": t["hidden"].double()}, 422, "bad_tensor", "dtype 'F64'"),
    "float-mask": (
        lambda t: t | {"attention_mask": t["attention_mask"].half()},
        422,
        "bad_tensor",
        "attention_mask must be an integer tensor",
    ),
    "over-batch": (
        lambda t: {k: v if k == "prefix_kv" else torch.cat([v, v]) for k, v in t.items()},
        413,
        "limit_exceeded",
        "batch size 6 is over this server's limit of 4",
    ),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_a_bad_forward_is_refused_from_its_header_without_decoding(client, model, backend, decodes, case):
    # Prepare
    mutate, status, code, pattern = FORWARD_CASES[case]
    step = step_for(model, backend, step_id=f"header-{case}")
    body = _raw(mutate(step.tensors), step.meta)

    # Execute
    response = client.post(schemas.FORWARD_PATH, content=body, headers=binary_headers(ALICE))

    # Assert
    assert_error(response, status, code, pattern)
    assert decodes == []
    assert_a_valid_step_succeeds(client, model, backend)
    assert decodes  # the valid step is decoded as before


def test_a_header_that_lies_about_its_data_is_refused(client, model, backend, decodes):
    step = step_for(model, backend, step_id="lying-header")
    body = blob(step.tensors, step.meta)[:-64]  # the header still declares every byte
    response = client.post(schemas.FORWARD_PATH, content=body, headers=binary_headers(ALICE))
    assert_error(response, 400, "bad_message", "declare .* bytes of data; it carries")
    assert decodes == []


def test_a_backward_with_a_grad_of_the_wrong_width_is_refused_without_decoding(
    client, model, backend, decodes
):
    step = step_for(model, backend, step_id="header-backward")
    body = _raw({schemas.GRAD_OUTPUT: torch.zeros(3, 7, 100)}, step.meta)
    response = client.post(schemas.BACKWARD_PATH, content=body, headers=binary_headers(ALICE))
    assert_error(response, 422, "bad_tensor", r"grad_output must have shape \(B, T, 64\)")
    assert decodes == []


@pytest.mark.parametrize(
    ("targets", "pattern"),
    [
        (torch.zeros(3, 7), "targets must be an integer tensor"),
        (torch.zeros(3, 6, dtype=torch.long), r"targets must have shape \(B, T\) = \(3, 7\); got \(3, 6\)"),
    ],
)
def test_a_loss_request_with_bad_targets_is_refused_without_decoding(
    client, model, backend, decodes, targets, pattern
):
    step = step_for(model, backend, head="server", step_id="header-loss")
    body = _raw(step.tensors | {schemas.TARGETS: targets}, step.meta)
    response = client.post(schemas.LOSS_PATH, content=body, headers=binary_headers(ALICE))
    assert_error(response, 422, "bad_tensor", pattern)
    assert decodes == []


def test_a_generation_open_with_a_foreign_prefix_is_refused_without_decoding(client, backend, decodes):
    tensors_in, meta = open_request(backend)
    tensors_in["prefix_kv"] = tensors_in["prefix_kv"][:1]  # one layer: another split
    response = post_open(client, tensors_in, meta)
    assert_error(response, 422, "bad_tensor", r"prefix_kv must have shape .*; got \(1, 2, 2, 3, 16\)")
    assert decodes == []


def post_open(client, tensors_in, meta):
    return client.post(schemas.SESSIONS_PATH, content=blob(tensors_in, meta), headers=binary_headers(ALICE))


def test_a_generation_step_of_the_wrong_width_is_refused_without_decoding(client, backend, decodes):
    # Prepare
    session, _, _ = open_session(client, backend)
    decodes.clear()
    tensors_in, meta = step_request(backend)
    wrong = blob(tensors_in | {"hidden": torch.randn(2, 1, 5)}, meta)

    # Execute: over HTTP and over the WebSocket
    over_http = client.post(step_path(session), content=wrong, headers=binary_headers(ALICE))
    stream = schemas.SESSION_STREAM_PATH.format(session_id=session)
    with client.websocket_connect(stream, headers={"authorization": f"Bearer {ALICE}"}) as ws:
        ws.send_bytes(wrong)
        over_socket = json.loads(ws.receive_text())

    # Assert
    assert_error(over_http, 422, "bad_tensor", r"\(B, T, 64\)")
    assert over_socket["status"] == 422 and "(B, T, 64)" in over_socket["detail"]
    assert decodes == []
