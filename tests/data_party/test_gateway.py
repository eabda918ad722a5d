"""The OpenAI-compatible gateway, driven by the official `openai` client over loopback."""

from __future__ import annotations

import httpx
import openai
import pytest

from live_server import LiveServer
from split_helpers import make_dirs, server_settings
from splitprefix.data_party.gateway import PLAIN_CHAT_STOP, ChatMessage, chat_prompt, create_gateway
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.model_party.app import create_app


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(openai client, the SplitModel behind the gateway): model server and gateway on loopback."""
    dirs = make_dirs(tmp_path_factory.mktemp("models"))
    with LiveServer(create_app(server_settings(dirs))) as server:
        model = SplitModel.open(dirs.emulator, ClientSettings(server.url, head="client"))
        with LiveServer(create_gateway(model, "tiny-split")) as front:
            yield openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0), model
        model.close()


def test_models_lists_the_split_model(gateway):
    client, _ = gateway
    assert [m.id for m in client.models.list()] == ["tiny-split"]


def test_completion_equals_split_model_generate(gateway):
    client, model = gateway
    expected = model.generate("The quick brown", GenerationConfig(max_new_tokens=6))[0]
    answer = client.completions.create(
        model="tiny-split", prompt="The quick brown", max_tokens=6, temperature=0
    )
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage is not None and answer.usage.completion_tokens == len(expected.token_ids)


def test_streamed_completion_adds_up_to_the_whole_one(gateway):
    client, _ = gateway
    whole = client.completions.create(model="tiny-split", prompt="Customer:", max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny-split", prompt="Customer:", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_with_and_without_streaming_agree_and_follow_the_plain_layout(gateway):
    client, model = gateway
    messages = [{"role": "user", "content": "I want a refund"}]
    prompt, stop = chat_prompt(model, [ChatMessage(**m) for m in messages])
    assert prompt == "user: I want a refund\nassistant:" and stop == (PLAIN_CHAT_STOP,)
    expected = model.generate(prompt, GenerationConfig(max_new_tokens=6, stop=stop))[0].text
    whole = client.chat.completions.create(model="tiny-split", messages=messages, max_tokens=6)  # type: ignore[arg-type]
    streamed = client.chat.completions.create(
        model="tiny-split", messages=messages, max_tokens=6, stream=True
    )  # type: ignore[arg-type]
    assert whole.choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_seeded_sampling_through_the_gateway_is_reproducible(gateway):
    client, _ = gateway
    ask = dict(model="tiny-split", prompt="The", max_tokens=8, temperature=1.5, seed=11)
    assert (
        client.completions.create(**ask).choices[0].text == client.completions.create(**ask).choices[0].text
    )  # type: ignore[call-overload]


def test_a_bad_request_gets_an_openai_style_error(gateway):
    client, _ = gateway
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-split", prompt=[], max_tokens=4)


def test_an_unreachable_model_server_is_a_502_not_a_crash(tmp_path_factory):
    dirs = make_dirs(tmp_path_factory.mktemp("down"))
    with LiveServer(create_app(server_settings(dirs))) as server:
        settings = ClientSettings(server.url, head="client", max_retries=0, timeout_s=2)
        model = SplitModel.open(dirs.emulator, settings)
    with LiveServer(create_gateway(model)) as front:  # the model server is gone now
        client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as raised:
            client.completions.create(model="splitprefix", prompt="The", max_tokens=3)
    model.close()
    assert raised.value.status_code == 502 and "model party" in str(raised.value)


def test_chat_uses_the_tokenizers_chat_template_when_it_has_one(gateway):
    _, model = gateway
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    model.tokenizer.chat_template = template
    try:
        prompt, stop = chat_prompt(model, [ChatMessage(role="user", content="hi")])
    finally:
        model.tokenizer.chat_template = None
    assert (prompt, stop) == ("<user>hi<assistant>", ())


def test_a_client_that_leaves_mid_stream_does_not_block_the_gateway(gateway):
    client, _ = gateway
    url = str(client.base_url).rstrip("/")
    body = {"model": "tiny-split", "prompt": "The", "max_tokens": 100, "stream": True, "stop": []}
    with httpx.stream("POST", url + "/completions", json=body, timeout=10) as response:
        first = next(response.iter_lines())  # read one event, then hang up
    assert first.startswith("data: ")
    answer = client.with_options(timeout=20).completions.create(
        model="tiny-split", prompt="The", max_tokens=3
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
