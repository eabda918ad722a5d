"""Property-based fuzz of the gateway's OpenAI routes: any JSON body, with the key or without it,
is answered without a 5xx, and every refusal has OpenAI's error body."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from live_server import LiveServer
from split_helpers import make_dirs, server_settings
from splitprefix.data_party.gateway import create_gateway
from splitprefix.data_party.gateway_settings import GatewaySettings
from splitprefix.data_party.generate import SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.model_party.app import create_app

KEY = "gateway-fuzz-key-0123456789"
NUMBERS = st.one_of(
    st.none(),
    st.integers(-5, 10),
    st.sampled_from([2**31, 2**63, 2**70, -(2**70)]),
    st.floats(allow_nan=True),
)
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "\nuser:", "The", "\x00"]))
FIELDS = {
    "model": st.one_of(st.none(), TEXT),
    "max_tokens": NUMBERS,
    "max_completion_tokens": NUMBERS,
    "temperature": NUMBERS,
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "seed": NUMBERS,
    "n": NUMBERS,
    "stop": st.one_of(st.none(), TEXT, st.lists(TEXT, max_size=3)),
    "stream": st.one_of(st.booleans(), st.none(), st.integers(0, 2)),
}
PROMPT = st.one_of(TEXT, st.lists(TEXT, max_size=3), st.integers(), st.none())
CONTENT = st.one_of(
    TEXT, st.none(), st.lists(st.dictionaries(st.sampled_from(["type", "text"]), TEXT), max_size=2)
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]), "content": CONTENT}), max_size=3
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    dirs = make_dirs(tmp_path_factory.mktemp("models"))
    with LiveServer(create_app(server_settings(dirs))) as server:
        model = SplitModel.open(dirs.emulator, ClientSettings(server.url, head="client"))
        limits = GatewaySettings(api_key=KEY, max_tokens_limit=4, max_prompt_tokens=24)
        with TestClient(create_gateway(model, "tiny", 2, limits), raise_server_exceptions=False) as client:
            yield client
        model.close()


@st.composite
def bodies(draw: st.DrawFn, chat: bool) -> dict:
    fields = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=5))
    body = {name: draw(FIELDS[name]) for name in fields}
    body["messages" if chat else "prompt"] = draw(MESSAGES if chat else PROMPT)
    return body


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_body_gets_an_answer_or_an_openai_error_never_a_5xx(gateway, data):
    # Prepare
    chat = data.draw(st.booleans(), label="chat")
    body = data.draw(bodies(chat), label="body")
    keyed = data.draw(st.sampled_from([True, True, True, False]), label="key")
    headers = {"authorization": f"Bearer {KEY}"} if keyed else {}
    path = "/v1/chat/completions" if chat else "/v1/completions"

    # Execute
    response = gateway.post(
        path, content=json.dumps(body), headers=headers | {"content-type": "application/json"}
    )

    # Assert
    event(f"{path} {response.status_code}")
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif body.get("stream") is True:
        assert "data: [DONE]" in response.text and '"error"' not in response.text, response.text
