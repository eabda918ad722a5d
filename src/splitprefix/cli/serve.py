"""The `serve` command: the model party's split-training server."""

from __future__ import annotations

import typer

from splitprefix.cli.options import Settings, settings_command
from splitprefix.model_party.settings import ServerSettings

SERVE_OPTIONS = {"settings": Settings(ServerSettings, arguments={"model_dir": "model"})}
"""`serve`'s settings: every field of `ServerSettings` an option, MODEL its model directory."""


@settings_command(SERVE_OPTIONS)
def serve_command(
    *,
    settings: ServerSettings,
    access_log: bool = typer.Option(
        False, help="Log one line per request (off by default: a generation step is one request per token)."
    ),
) -> None:
    """Model party: serve layers [K, L), the norm and the head of MODEL to data parties, for split training
    and split generation (sessions under /v1/generate/sessions)."""
    import logging

    import torch
    import uvicorn

    from splitprefix.model_party.app import create_app

    if settings.threads:
        torch.set_num_threads(settings.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_level="info",
        access_log=access_log,
        # generation steps over a WebSocket (model_party.stream): websockets' current implementation,
        # not its deprecated legacy one that uvicorn picks by default
        ws="websockets-sansio",
        ws_max_size=settings.max_request_bytes,
        # the global cap: uvicorn answers 503 beyond it, before any request is read
        limit_concurrency=settings.max_connections,
    )
