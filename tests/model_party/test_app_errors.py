"""Every client mistake gets a 4xx with a code and a detail that says what to fix, and the server
keeps serving: each test ends with a valid step that must still succeed."""

from __future__ import annotations

import logging

import pytest
import torch
from fastapi.testclient import TestClient

from app_fixtures import ALICE, BOB, assert_a_valid_step_succeeds, post, step_for
from splitprefix.errors import ShapeMismatchError
from splitprefix.model_party.app import create_app
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from splitprefix.wire.tensors import CONTENT_TYPE, decode
from top_helpers import SPLIT_AT, assert_error, binary_headers


def _set(name, value):
    return lambda t, m: (t | {name: value(t[name]) if callable(value) else value}, m)


def _meta(**fields):
    return lambda t, m: (t, m | fields)


def _drop_meta(name):
    return lambda t, m: (t, {k: v for k, v in m.items() if k != name})


def _drop(name):
    return lambda t, m: ({k: v for k, v in t.items() if k != name}, m)


def _nan(tensor):
    out = tensor.clone()
    out.view(-1)[0] = float("nan")
    return out


def _repeat_batch(t, m):
    return {k: (v if k == "prefix_kv" else torch.cat([v, v[:2]])) for k, v in t.items()}, m


def _long_prefix(t, m):
    kv = torch.cat([t["prefix_kv"]] * 4, dim=3)  # P = 12, so P + T = 19 > 16
    mask = torch.cat([torch.ones(3, 9, dtype=torch.long), t["attention_mask"]], dim=1)
    return t | {"prefix_kv": kv, "attention_mask": mask}, m


FORWARD_CASES = {
    "future-protocol": (_meta(protocol_version=3), 422, "unsupported_protocol", r"must be 2; got 3\. Use a"),
    "no-protocol": (_drop_meta("protocol_version"), 422, "unsupported_protocol", "got None"),
    "no-step-id": (_drop_meta("step_id"), 422, "invalid_meta", "'step_id' must be a non-empty string"),
    "unknown-head": (_meta(head="middle"), 422, "invalid_meta", "'head' must be 'server' or 'client'"),
    "wire-dtype": (_meta(wire_dtype="fp8"), 422, "invalid_meta", r"'wire_dtype' must be one of \['bf16'"),
    "keep-graph": (_meta(keep_graph="yes"), 422, "invalid_meta", "'keep_graph' must be true or false"),
    "no-split-at": (
        _drop_meta("split_at"),
        422,
        "invalid_meta",
        "'split_at' must be present in every forward",
    ),
    "wrong-k": (_meta(split_at=3), 422, "split_mismatch", r"layers \[2, 4\), so split_at must be 2; got 3"),
    "fingerprint": (_meta(bottom_sha256="0" * 64), 422, "fingerprint_mismatch", "come from another model"),
    "missing-tensor": (_drop("prefix_kv"), 422, "bad_tensor", r"missing \['prefix_kv'\], unexpected \[\]"),
    "extra-tensor": (_set("labels", torch.zeros(3, 7)), 422, "bad_tensor", r"unexpected \['labels'\]"),
    "head-server": (_meta(head="server"), 422, "wrong_route", r"a head=server step goes to /v1/train/loss"),
    "hidden-width": (
        _set("hidden", lambda h: h[..., :32]),
        422,
        "bad_tensor",
        r"hidden must have shape \(B, T, 64\) with B, T >= 1; got \(3, 7, 32\)",
    ),
    "hidden-rank": (_set("hidden", lambda h: h[0]), 422, "bad_tensor", r"got \(7, 64\)"),
    "prefix-layers": (
        _set("prefix_kv", lambda kv: kv[:1]),
        422,
        "bad_tensor",
        r"prefix_kv must have shape .* = \(2, 2, 2, P, 16\); got \(1, 2, 2, 3, 16\)",
    ),
    "mask-without-prefix": (
        _set("attention_mask", lambda m: m[:, 3:]),
        422,
        "bad_tensor",
        r"attention_mask must have shape \(B, P \+ T\) = \(3, 3 \+ 7\); got \(3, 7\)",
    ),
    "positions-shape": (
        _set("positions", lambda p: p[:, :5]),
        422,
        "bad_tensor",
        r"positions must .* got \(3, 5\)",
    ),
    "hidden-int": (_set("hidden", lambda h: h.long()), 422, "bad_tensor", "hidden must be a floating tensor"),
    "mask-float": (
        _set("attention_mask", lambda m: m.float()),
        422,
        "bad_tensor",
        "must be an integer tensor",
    ),
    "mask-values": (
        _set("attention_mask", lambda m: m * 2),
        422,
        "bad_tensor",
        r"only 0 and 1; got values \[2\]",
    ),
    "negative-positions": (_set("positions", lambda p: p - 10), 422, "bad_tensor", "positions must be >= 0"),
    "nan-hidden": (_set("hidden", _nan), 422, "non_finite", "'hidden' contains NaN or Inf"),
    "inf-prefix": (
        _set("prefix_kv", lambda kv: kv / 0),
        422,
        "non_finite",
        "'prefix_kv' contains NaN or Inf",
    ),
    "batch-limit": (_repeat_batch, 413, "limit_exceeded", "batch size 5 is over this server's limit of 4"),
    "token-limit": (_long_prefix, 413, "limit_exceeded", r"P \+ T = 19 .* limit of 16"),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_a_bad_forward_gets_a_4xx_that_says_what_to_fix(client, model, backend, case):
    # Prepare
    mutate, status, code, pattern = FORWARD_CASES[case]
    step = step_for(model, backend, step_id=f"bad-forward-{case}")
    tensors, meta = mutate(step.tensors, step.meta)

    # Execute
    response = post(client, schemas.FORWARD_PATH, tensors, meta)

    # Assert
    assert_error(response, status, code, pattern)
    assert_a_valid_step_succeeds(client, model, backend)


def _grad(shape_change=None):
    def make(t, m, output):
        grad = torch.ones_like(output)
        return ({"grad_output": grad if shape_change is None else shape_change(grad)}, m)

    return make


BACKWARD_CASES = {
    "old-protocol": (_meta(protocol_version=1), 422, "unsupported_protocol", "must be 2; got 1"),
    "wrong-k": (_meta(split_at=1), 422, "split_mismatch", "split_at must be 2; got 1"),
    "fingerprint": (
        _meta(bottom_sha256="f" * 64),
        422,
        "fingerprint_mismatch",
        r"ffffffffffff… is not this model's",
    ),
    "other-head": (_meta(head="server"), 422, "wrong_route", "serves head=client training steps"),
    "no-grad": (_drop("grad_output"), 422, "bad_tensor", r"missing \['grad_output'\]"),
    "grad-shape": (
        _set("grad_output", lambda g: g[:-1]),
        422,
        "bad_tensor",
        r"grad_output must have shape the forward output's shape \(3, 7, 64\); got \(2, 7, 64\)",
    ),
    "grad-int": (
        _set("grad_output", lambda g: g.long()),
        422,
        "bad_tensor",
        "grad_output must be a floating",
    ),
    "grad-nan": (_set("grad_output", _nan), 422, "non_finite", "'grad_output' contains NaN or Inf"),
    "partial-inputs": (
        _set("hidden", torch.zeros(3, 7, 64)),
        422,
        "bad_tensor",
        r"missing \['attention_mask', 'positions', 'prefix_kv'\]",
    ),
}


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_a_bad_backward_gets_a_4xx_and_keeps_the_graph(client, model, backend, case):
    # Prepare: a held forward
    mutate, status, code, pattern = BACKWARD_CASES[case]
    step = step_for(model, backend, step_id=f"bad-backward-{case}")
    forward = post(client, schemas.FORWARD_PATH, step.tensors, step.meta)
    grad = {"grad_output": torch.ones_like(decode(forward.content)[0]["output"])}
    tensors, meta = mutate(grad, step.meta)

    # Execute
    response = post(client, schemas.BACKWARD_PATH, tensors, meta)

    # Assert: refused, and the correct backward of the same step still works
    assert_error(response, status, code, pattern)
    assert post(client, schemas.BACKWARD_PATH, grad, step.meta).status_code == 200
    assert_a_valid_step_succeeds(client, model, backend)


LOSS_CASES = {
    "head-client": (
        _meta(head="client"),
        422,
        "wrong_route",
        r"a head=client step goes to /v1/train/forward",
    ),
    "no-targets": (_drop("targets"), 422, "bad_tensor", r"missing \['targets'\]"),
    "targets-float": (_set("targets", lambda t: t.float()), 422, "bad_tensor", "targets must be an integer"),
    "targets-shape": (_set("targets", lambda t: t[:, :5]), 422, "bad_tensor", r"targets must have shape"),
    "targets-range": (
        _set("targets", lambda t: t.clamp(min=0) + 10_000),
        422,
        "bad_tensor",
        r"targets must be token ids in \[0, 320\) or -100",
    ),
    "targets-on-padding": (
        _set("targets", lambda t: t.clamp(min=0)),
        422,
        "bad_tensor",
        "targets must be -100 on padding",
    ),
    "grad-flag": (_meta(grad="yes"), 422, "invalid_meta", "'grad' must be true or false"),
    "no-fingerprint": (_drop_meta("bottom_sha256"), 422, "invalid_meta", "'bottom_sha256' must be present"),
}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_a_bad_loss_request_gets_a_4xx_that_says_what_to_fix(client, model, backend, case):
    # Prepare: a left-padded batch, so that some positions are padding
    mutate, status, code, pattern = LOSS_CASES[case]
    step = step_for(model, backend, head="server", step_id=f"bad-loss-{case}", padding="left")
    tensors, meta = mutate(step.tensors, step.meta)

    # Execute
    response = post(client, schemas.LOSS_PATH, tensors, meta)

    # Assert
    assert_error(response, status, code, pattern)
    assert post(client, schemas.LOSS_PATH, step.tensors, step.meta).status_code == 200


def test_a_backward_for_an_unknown_step_without_inputs_gets_409(client, model, backend):
    step = step_for(model, backend, step_id="never-forwarded")
    response = post(client, schemas.BACKWARD_PATH, {"grad_output": torch.ones(3, 7, 64)}, step.meta)
    assert_error(response, 409, "graph_missing", "resend this backward with the forward inputs hidden, ")
    # the stateless path: the same backward with the inputs is recomputed
    recompute = post(
        client, schemas.BACKWARD_PATH, {"grad_output": torch.ones(3, 7, 64)} | step.tensors, step.meta
    )
    assert recompute.status_code == 200, recompute.text


def test_a_party_cannot_run_the_backward_of_anothers_step(client, model, backend):
    # Prepare
    step = step_for(model, backend, step_id="alice-only")
    post(client, schemas.FORWARD_PATH, step.tensors, step.meta, token=ALICE)
    grad = {"grad_output": torch.ones(3, 7, 64)}

    # Execute
    as_bob = post(client, schemas.BACKWARD_PATH, grad, step.meta, token=BOB)
    as_alice = post(client, schemas.BACKWARD_PATH, grad, step.meta, token=ALICE)

    # Assert
    assert_error(as_bob, 409, "graph_missing", "'alice-only'")
    assert as_alice.status_code == 200


ENDPOINTS = [("GET", schemas.INFO_PATH), ("POST", schemas.FORWARD_PATH), ("POST", schemas.BACKWARD_PATH)]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize(
    ("authorization", "pattern"),
    [
        (None, "needs a bearer token"),
        (f"Bearer {ALICE}-not", "not valid"),
        (f"Basic {ALICE}", "'Bearer <token>'"),
    ],
)
def test_a_missing_or_bad_token_gets_401(client, model, backend, method, path, authorization, pattern):
    headers = {"content-type": CONTENT_TYPE} | ({"authorization": authorization} if authorization else {})
    response = client.request(method, path, content=b"x" if method == "POST" else None, headers=headers)
    assert_error(response, 401, "unauthorized", pattern)
    assert response.headers["www-authenticate"] == "Bearer"
    assert_a_valid_step_succeeds(client, model, backend)


@pytest.mark.parametrize("path", [schemas.FORWARD_PATH, schemas.BACKWARD_PATH])
def test_an_oversized_body_gets_413_before_it_is_read(client, model, backend, path):
    response = client.post(path, content=b"\0" * 100_001, headers=binary_headers(ALICE))
    assert_error(response, 413, "too_large", r"body is 100001 bytes; this server accepts at most 100000")
    # without Content-Length the stream is cut at the limit
    chunks = iter([b"\0" * 60_000, b"\0" * 60_000])
    streamed = client.post(path, content=chunks, headers=binary_headers(ALICE))
    assert_error(streamed, 413, "too_large", r"over 100000 bytes")
    assert_a_valid_step_succeeds(client, model, backend)


@pytest.mark.parametrize("path", [schemas.FORWARD_PATH, schemas.BACKWARD_PATH])
@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "pattern"),
    [
        (b"garbage", CONTENT_TYPE, 400, "bad_message", "not a splitprefix safetensors message"),
        (b"", CONTENT_TYPE, 400, "bad_message", "not a splitprefix safetensors message"),
        (b'{"hidden": [1, 2]}', "application/json", 415, "unsupported_media", f"Content-Type {CONTENT_TYPE}"),
    ],
)
def test_a_body_that_is_not_a_message_gets_4xx(
    client, model, backend, path, body, content_type, status, code, pattern
):
    headers = {"content-type": content_type, "authorization": f"Bearer {ALICE}"}
    assert_error(client.post(path, content=body, headers=headers), status, code, pattern)
    assert_a_valid_step_succeeds(client, model, backend)


def test_a_head_mode_the_server_does_not_offer_gets_422(model_dir, model):
    # Prepare: a server that keeps labels at the data parties
    backend = TopBackend(ServerSettings(model_dir, SPLIT_AT, head="client"))
    client = TestClient(create_app(backend))
    step = step_for(model, backend, head="server")

    # Execute
    response = post(client, schemas.LOSS_PATH, step.tensors, step.meta, token=None)

    # Assert
    assert_error(response, 422, "head_not_enabled", r"head=server is not enabled .* ask for head=client")
    assert client.get(schemas.INFO_PATH).json()["warnings"] == [schemas.HEAD_CLIENT_WARNING]
    ok = step_for(model, backend, head="client")
    assert post(client, schemas.FORWARD_PATH, ok.tensors, ok.meta, token=None).status_code == 200


def test_unknown_routes_and_methods_get_an_error_body(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found", "Not Found; the API is documented at /docs")
    assert_error(client.get(schemas.FORWARD_PATH), 405, "method_not_allowed", "Method Not Allowed")


def test_a_server_bug_gets_a_generic_500_and_the_server_keeps_serving(
    client, model, backend, monkeypatch, caplog
):
    # Prepare
    def broken(*args):
        raise RuntimeError("secret internals")

    step = step_for(model, backend, step_id="bug")
    monkeypatch.setattr(backend, "forward", broken)
    monkeypatch.setattr(backend, "info", broken)

    # Execute
    with caplog.at_level(logging.ERROR):
        response = post(client, schemas.FORWARD_PATH, step.tensors, step.meta)
        info = client.get(schemas.INFO_PATH, headers=binary_headers(ALICE))

    # Assert
    for answer in (response, info):
        assert_error(answer, 500, "internal_error", "internal server error")
        assert "secret" not in answer.text
    assert "secret internals" in caplog.text
    monkeypatch.undo()
    assert_a_valid_step_succeeds(client, model, backend)


def test_bad_input_found_deep_in_the_model_is_still_a_4xx(client, model, backend, monkeypatch):
    # Prepare: validation misses something and the model's own check catches it
    def refuse(*args):
        raise ShapeMismatchError("attention_mask must be (3, 10); got (3, 7)")

    step = step_for(model, backend, step_id="deep")
    monkeypatch.setattr(backend, "forward", refuse)

    # Execute
    response = post(client, schemas.FORWARD_PATH, step.tensors, step.meta)

    # Assert
    assert_error(response, 422, "bad_request", r"attention_mask must be \(3, 10\); got \(3, 7\)")
    monkeypatch.undo()
    assert_a_valid_step_succeeds(client, model, backend)
