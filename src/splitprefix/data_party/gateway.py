"""An OpenAI-compatible HTTP API on the data party's side, over a `SplitModel`.

Existing OpenAI clients and tools talk to it unchanged: `/v1/models`, `/v1/completions` and
`/v1/chat/completions`, with or without `stream=true` (server-sent events, ending `data: [DONE]`).
It runs where the data party's text lives; only layer-K hidden states go on to the model party.

Chat messages go through the tokenizer's chat template when it has one. Without one they are laid
out plainly, one `role: content` line per message followed by `assistant:`, and generation stops
at the next `\\nuser:` line.

Requests are served one at a time (the split model holds one generation's caches); the others wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from splitprefix.data_party.gateway_guard import (
    GatewayGuard,
    check_asked_tokens,
    check_prompts,
    error_handlers,
    openai_error,
)
from splitprefix.data_party.gateway_settings import GatewaySettings
from splitprefix.data_party.generate import Completion, SplitModel
from splitprefix.data_party.remote import RemoteError
from splitprefix.data_party.sampling import GenerationConfig
from splitprefix.errors import ConfigError, SplitPrefixError

PLAIN_CHAT_STOP = "\nuser:"


class _Sampling(BaseModel):
    """The OpenAI sampling fields this gateway honours; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def generation_config(
    request: _Sampling, default_max_tokens: int, extra_stop: tuple[str, ...] = ()
) -> GenerationConfig:
    """The request's sampling fields as a GenerationConfig; temperature 0 (or none given) is greedy."""
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    temperature = 1.0 if request.temperature is None else request.temperature
    return GenerationConfig(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
        do_sample=temperature > 0 and request.temperature is not None,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=request.top_k or 0,
        top_p=request.top_p or 1.0,
        seed=request.seed,
        stop=stop + extra_stop,
    )


def chat_prompt(model: SplitModel, messages: list[ChatMessage]) -> tuple[str, tuple[str, ...]]:
    """The prompt text for `messages` and the stop strings its layout needs."""
    turns = [{"role": m.role, "content": _text(m.content)} for m in messages]
    if getattr(model.tokenizer, "chat_template", None):
        text = model.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return str(text), ()
    lines = "".join(f"{t['role']}: {t['content']}\n" for t in turns)
    return lines + "assistant:", (PLAIN_CHAT_STOP,)


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
    return content or ""


def create_gateway(
    model: SplitModel,
    model_name: str = "splitprefix",
    default_max_tokens: int = 128,
    settings: GatewaySettings | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `model`, which it owns for the app's lifetime.

    `settings` holds the API key and the limits (see `gateway_guard`); by default no key.
    """
    settings = settings or GatewaySettings()
    if default_max_tokens > settings.max_tokens_limit:
        raise ConfigError(
            f"the default max_tokens {default_max_tokens} is over max_tokens_limit {settings.max_tokens_limit}"
        )
    app = FastAPI(title="splitprefix gateway", description=__doc__, exception_handlers=error_handlers())
    app.add_middleware(GatewayGuard, settings=settings)
    lock = threading.Lock()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions", response_model=None)
    def completions(request: CompletionRequest) -> JSONResponse | StreamingResponse:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        _check_request(model, request, prompts, "prompt", settings)
        config = generation_config(request, default_max_tokens)
        return _answer(model, lock, prompts, config, request.stream, _TextShape(model_name, chat=False))

    @app.post("/v1/chat/completions", response_model=None)
    def chat(request: ChatRequest) -> JSONResponse | StreamingResponse:
        prompt, stop = chat_prompt(model, request.messages)
        _check_request(model, request, [prompt], "messages", settings)
        config = generation_config(request, default_max_tokens, stop)
        return _answer(model, lock, [prompt], config, request.stream, _TextShape(model_name, chat=True))

    @app.exception_handler(SplitPrefixError)
    async def refused(_: Any, error: Exception) -> JSONResponse:
        if isinstance(error, RemoteError):  # the model party's server refused or is unreachable
            return openai_error(502, f"the model party's server failed: {error}", "upstream_error")
        return openai_error(400, str(error))

    return app


def _check_request(
    model: SplitModel, request: _Sampling, prompts: list[str], param: str, settings: GatewaySettings
) -> None:
    """Refuse a request that asks more than the gateway's limits, before it waits for the model."""
    check_asked_tokens(request.max_completion_tokens or request.max_tokens, settings)
    check_prompts([0] * len(prompts), param, settings)  # the count, before tokenizing them all
    if prompts:
        check_prompts(model.encode(prompts)[1].sum(dim=1).tolist(), param, settings)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "splitprefix"}


class _TextShape:
    """Builds the OpenAI JSON objects of a completion or a chat completion."""

    def __init__(self, model_name: str, chat: bool) -> None:
        self.model, self.chat = model_name, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def full(self, results: list[Completion], prompt_tokens: int) -> dict[str, Any]:
        choices = [self._choice(i, r.text, r.finish_reason, delta=False) for i, r in enumerate(results)]
        generated = sum(len(r.token_ids) for r in results)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated}
        return self._wrap(choices, False) | {"usage": usage | {"total_tokens": prompt_tokens + generated}}

    def chunk(self, row: int, text: str | None, finish_reason: str | None) -> str:
        body = self._wrap([self._choice(row, text, finish_reason, delta=True)], True)
        return f"data: {json.dumps(body)}\n\n"

    def _choice(self, index: int, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if not self.chat:
            return choice | {"text": text or ""}
        message = {"role": "assistant", "content": text} if text is not None or not delta else {}
        return choice | ({"delta": message} if delta else {"message": message})

    def _wrap(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else ""
        )
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def _answer(
    model: SplitModel,
    lock: threading.Lock,
    prompts: list[str],
    config: GenerationConfig,
    stream: bool,
    shape: _TextShape,
) -> JSONResponse | StreamingResponse:
    if not stream:
        with lock:
            prompt_tokens = int(model.encode(prompts)[1].sum())
            results = model.generate(prompts, config)
        return JSONResponse(shape.full(results, prompt_tokens))
    model.encode(prompts)  # refuse a bad prompt with a status, before the stream starts
    return StreamingResponse(_events(model, lock, prompts, config, shape), media_type="text/event-stream")


async def _events(
    model: SplitModel, lock: threading.Lock, prompts: list[str], config: GenerationConfig, shape: _TextShape
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk per row with its finish reason.

    The generation runs in its own thread and hands pieces over through a queue. When the client
    goes away, the cancelled stream sets `stop`, and the thread ends the generation (closing its
    server session) and releases the lock at the next token, so a vanished client never blocks the
    gateway.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def put(kind: str, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))

    def produce() -> None:
        try:
            with lock:
                rows: list[Any] = []
                for row, delta in model.stream(prompts, config, rows):
                    if stop.is_set():
                        return
                    put("text", (row, delta))
                put("end", [text.completion().finish_reason for text in rows])
        except Exception as error:
            put("error", error)

    threading.Thread(target=produce, name="gateway-generation", daemon=True).start()
    try:
        while True:
            kind, item = await queue.get()
            if kind == "text":
                yield shape.chunk(item[0], item[1], None)
            elif kind == "end":
                for row, reason in enumerate(item):
                    yield shape.chunk(row, None if shape.chat else "", reason)
                break
            else:  # the status line is already sent: report the failure in the stream
                yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'upstream_error'}})}\n\n"
                break
    finally:
        stop.set()
    yield "data: [DONE]\n\n"
