"""`splitprefix generate` and `splitprefix gateway`: split inference for the data party."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from splitprefix.cli.options import Settings, settings_command
from splitprefix.cli.train import PRIVACY_OPTIONS, TOKEN_ENV, privacy_line
from splitprefix.data_party.gateway_settings import API_KEY_ENV, GatewaySettings, read_api_key
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.sampling import GenerationConfig
from splitprefix.exposure import check_exposure
from splitprefix.runtime import RuntimeSettings

_EMULATOR = typer.Argument(..., help="Emulator directory from the model party (`splitprefix emulate`).")
_PREFIX = typer.Option(None, "--prefix", help="Full-layout prefix directory; none = the base model.")
PARTY_OPTIONS = {
    "client": Settings(
        ClientSettings,
        exclude={"keep_graph"},  # generation has no backward
        flags={"server_url": "--server", "ca_path": "--ca"},
        envvars={"token": TOKEN_ENV},
        defaults={"head": "client"},
        helps={
            "head": "'client' applies the LM head here; 'server' has the server send logits.",
            "client_layers": "M: run the top M layers here too (U-shaped split, head=client), so their prefix "
            "never leaves.",
        },
    ),
    "privacy": PRIVACY_OPTIONS,
    "runtime": Settings(RuntimeSettings),
}
"""The data party's connection, noise and device, as `generate` and `gateway` take them."""


@settings_command(PARTY_OPTIONS)
def generate_command(
    emulator: Path = _EMULATOR,
    prompt: str = typer.Argument(..., help="The text to continue."),
    prefix: Path | None = _PREFIX,
    max_new_tokens: int = typer.Option(GenerationConfig.max_new_tokens, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 decodes greedily; above 0 samples."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (1.0 = off)."),
    seed: int | None = typer.Option(None, help="Seed of the sampling: same seed, same text."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop before this string (repeatable)."),
    *,
    client: ClientSettings,
    privacy: PrivacyConfig | None,
    runtime: RuntimeSettings,
) -> None:
    """Data party: continue PROMPT through the split model and stream the text to the terminal.

    The prompt's text and token ids stay here; the server's generation session
    (/v1/generate/sessions) receives layer-K hidden states only. A session the server lost is
    reopened transparently.
    """
    from splitprefix.data_party.accounting import generation_releases, privacy_report
    from splitprefix.data_party.generate import SplitModel

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop or ()),
    )
    with SplitModel.open(emulator, client, prefix, privacy, runtime) as model:
        model.generate(prompt, config, on_text=lambda _, text: typer.echo(text, nl=False))
        prompt_tokens = int(model.encode([prompt])[1].sum())
    typer.echo()
    spent = privacy_report(privacy, {"prompt": generation_releases(prompt_tokens, max_new_tokens)})
    if spent is not None:
        typer.echo(privacy_line(spent), err=True)


@settings_command(PARTY_OPTIONS, guard=Settings(GatewaySettings, exclude={"api_key"}))
def gateway_command(
    emulator: Path = _EMULATOR,
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
    *,
    client: ClientSettings,
    privacy: PrivacyConfig | None,
    runtime: RuntimeSettings,
    guard: GatewaySettings,
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

    guard = replace(guard, api_key=read_api_key(api_key, api_key_file))
    credentials = f"--api-key, --api-key-file or ${API_KEY_ENV}"
    check_exposure(host, guard.api_key is not None, insecure, "the gateway", credentials)
    with SplitModel.open(emulator, client, prefix, privacy, runtime) as model:
        app = create_gateway(model, model_name, max_tokens, guard)
        uvicorn.run(app, host=host, port=port, log_level="info")
