"""`splitprefix generate` and `splitprefix gateway`: split inference for the data party."""

from __future__ import annotations

from pathlib import Path

import typer

from splitprefix.cli.train import (
    DEVICE_OPTION,
    DTYPE_OPTION,
    NOISE_SEED_HELP,
    TOKEN_ENV,
    client_settings,
    privacy_config,
    privacy_line,
    runtime_settings,
)
from splitprefix.data_party.gateway_settings import API_KEY_ENV, GatewaySettings, read_api_key
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.sampling import GenerationConfig
from splitprefix.exposure import check_exposure

_EMULATOR = typer.Argument(..., help="Emulator directory from the model party (`splitprefix emulate`).")
_SERVER = typer.Option(..., "--server", help="URL of `splitprefix serve`, e.g. http://127.0.0.1:8000.")
_PREFIX = typer.Option(None, "--prefix", help="Full-layout prefix directory; none = the base model.")
_TOKEN = typer.Option(None, "--token", envvar=TOKEN_ENV, help="Bearer token from the model party.")
_HEAD = typer.Option("client", help="'client' applies the LM head here; 'server' has the server send logits.")
_CLIENT_LAYERS = typer.Option(
    ClientSettings.client_layers,
    "--client-layers",
    help="M: run the top M layers here too (U-shaped split, head=client), so their prefix never leaves.",
)
_WIRE = typer.Option(ClientSettings.wire_dtype, help="Tensors on the wire: fp32, bf16 or fp16.")
_TIMEOUT = typer.Option(ClientSettings.timeout_s, help="Seconds to wait for one answer.")
_RETRIES = typer.Option(ClientSettings.max_retries, help="Retries per call on network errors and 5xx.")
_CA = typer.Option(None, "--ca", help="CA bundle of a self-signed https server.")
_CLIP = typer.Option(
    None, "--clip", help="Clip each token's layer-K state to this L2 norm C before it leaves."
)
_NOISE = typer.Option(
    0.0, "--noise", help="Add Gaussian noise of std noise * C to the sent states (needs --clip)."
)
_NOISE_SEED = typer.Option(None, "--noise-seed", help=NOISE_SEED_HELP)


def generate_command(
    emulator: Path = _EMULATOR,
    prompt: str = typer.Argument(..., help="The text to continue."),
    server: str = _SERVER,
    prefix: Path | None = _PREFIX,
    max_new_tokens: int = typer.Option(GenerationConfig.max_new_tokens, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 decodes greedily; above 0 samples."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (1.0 = off)."),
    seed: int | None = typer.Option(None, help="Seed of the sampling: same seed, same text."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop before this string (repeatable)."),
    token: str | None = _TOKEN,
    head: str = _HEAD,
    client_layers: int = _CLIENT_LAYERS,
    wire_dtype: str = _WIRE,
    timeout_s: float = _TIMEOUT,
    max_retries: int = _RETRIES,
    ca_path: Path | None = _CA,
    clip: float | None = _CLIP,
    noise: float = _NOISE,
    noise_seed: int | None = _NOISE_SEED,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Data party: continue PROMPT through the split model and stream the text to the terminal.

    The prompt's text and token ids stay here; the server's generation session
    (/v1/generate/sessions) receives layer-K hidden states only. A session the server lost is
    reopened transparently.
    """
    from splitprefix.data_party.accounting import generation_releases, privacy_report
    from splitprefix.data_party.generate import SplitModel

    settings = client_settings(
        server, token, head, wire_dtype, False, timeout_s, max_retries, ca_path, client_layers
    )
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop or ()),
    )
    privacy, runtime = privacy_config(clip, noise, noise_seed), runtime_settings(device, dtype)
    with SplitModel.open(emulator, settings, prefix, privacy, runtime) as model:
        model.generate(prompt, config, on_text=lambda _, text: typer.echo(text, nl=False))
        prompt_tokens = int(model.encode([prompt])[1].sum())
    typer.echo()
    spent = privacy_report(privacy, {"prompt": generation_releases(prompt_tokens, max_new_tokens)})
    if spent is not None:
        typer.echo(privacy_line(spent), err=True)


def gateway_command(
    emulator: Path = _EMULATOR,
    server: str = _SERVER,
    prefix: Path | None = _PREFIX,
    host: str = typer.Option("127.0.0.1", help="Interface the gateway listens on."),
    port: int = typer.Option(8080, help="TCP port of the gateway."),
    model_name: str = typer.Option("splitprefix", help="Model id that /v1/models lists."),
    max_tokens: int = typer.Option(128, help="Tokens generated when a request gives no max_tokens."),
    api_key: str | None = typer.Option(
        None, envvar=API_KEY_ENV, help="Key clients must send as 'Authorization: Bearer <key>'."
    ),
    api_key_file: Path | None = typer.Option(None, help="File holding the API key (instead of --api-key)."),
    insecure: bool = typer.Option(
        False, help="Allow a non-loopback --host without an API key: anyone who reaches it may use it."
    ),
    max_tokens_limit: int = typer.Option(
        GatewaySettings.max_tokens_limit, help="Largest max_tokens a request may ask for."
    ),
    max_prompt_tokens: int = typer.Option(
        GatewaySettings.max_prompt_tokens, help="Longest prompt, in tokens."
    ),
    max_prompts: int = typer.Option(GatewaySettings.max_prompts, help="Prompts per completions request."),
    max_concurrent: int = typer.Option(
        GatewaySettings.max_concurrent, help="Requests in flight (429 beyond)."
    ),
    max_request_bytes: int = typer.Option(GatewaySettings.max_request_bytes, help="Largest request body."),
    token: str | None = _TOKEN,
    head: str = _HEAD,
    client_layers: int = _CLIENT_LAYERS,
    wire_dtype: str = _WIRE,
    timeout_s: float = _TIMEOUT,
    max_retries: int = _RETRIES,
    ca_path: Path | None = _CA,
    clip: float | None = _CLIP,
    noise: float = _NOISE,
    noise_seed: int | None = _NOISE_SEED,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Data party: serve the split model as an OpenAI-compatible API.

    Endpoints: /v1/models, /v1/completions and /v1/chat/completions, with stream=true as server-sent
    events. Chat uses the tokenizer's chat template, or 'role: content' lines and 'assistant:'
    without one. Point any OpenAI client at http://HOST:PORT/v1, with the API key if one is set.
    A --host other than loopback needs an API key, or --insecure.
    """
    import uvicorn

    from splitprefix.data_party.gateway import create_gateway
    from splitprefix.data_party.generate import SplitModel

    guard = GatewaySettings(
        api_key=read_api_key(api_key, api_key_file),
        max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens,
        max_prompts=max_prompts,
        max_concurrent=max_concurrent,
        max_request_bytes=max_request_bytes,
    )
    credentials = f"--api-key, --api-key-file or ${API_KEY_ENV}"
    check_exposure(host, guard.api_key is not None, insecure, "the gateway", credentials)
    settings = client_settings(
        server, token, head, wire_dtype, False, timeout_s, max_retries, ca_path, client_layers
    )
    privacy, runtime = privacy_config(clip, noise, noise_seed), runtime_settings(device, dtype)
    with SplitModel.open(emulator, settings, prefix, privacy, runtime) as model:
        app = create_gateway(model, model_name, max_tokens, guard)
        uvicorn.run(app, host=host, port=port, log_level="info")
