"""The `serve` command: the model party's split-training server."""

from __future__ import annotations

from pathlib import Path

import typer

from splitprefix.model_party.settings import ServerSettings


def serve_command(
    model: str = typer.Argument(..., help="Full model directory, or 'builtin'."),
    split_at: int = typer.Option(
        ..., "--split-at", help="K: data parties run layers [0, K); this server the rest."
    ),
    host: str = typer.Option(ServerSettings.host, help="Interface to bind (loopback by default)."),
    port: int = typer.Option(ServerSettings.port, help="TCP port."),
    head: str = typer.Option(
        ServerSettings.head,
        help="Head modes offered: server (targets sent in clear), client (targets off the wire, still "
        "recoverable by this server from the gradients), or both.",
    ),
    tokens_file: Path | None = typer.Option(
        None, help="Bearer tokens per data party: JSON {name: token} or 'name token' lines."
    ),
    insecure: bool = typer.Option(
        False, help="Allow a non-loopback --host without --tokens-file: anyone who reaches it may use it."
    ),
    tls_cert: Path | None = typer.Option(None, help="PEM certificate for HTTPS."),
    tls_key: Path | None = typer.Option(None, help="PEM private key for HTTPS."),
    max_request_bytes: int = typer.Option(ServerSettings.max_request_bytes, help="Largest request body."),
    max_batch_size: int = typer.Option(ServerSettings.max_batch_size, help="Largest batch per request."),
    max_tokens: int = typer.Option(ServerSettings.max_tokens, help="Largest prefix + tokens per sequence."),
    graph_ttl_s: float = typer.Option(ServerSettings.graph_ttl_s, help="Seconds a forward graph is held."),
    max_graph_bytes: int = typer.Option(ServerSettings.max_graph_bytes, help="Memory cap of held graphs."),
    max_graphs_per_client: int = typer.Option(
        ServerSettings.max_graphs_per_client, help="Held graphs per data party."
    ),
    session_ttl_s: float = typer.Option(
        ServerSettings.session_ttl_s, help="Idle seconds before a generation session is dropped."
    ),
    max_sessions: int = typer.Option(ServerSettings.max_sessions, help="Generation sessions held at once."),
    max_sessions_per_client: int = typer.Option(
        ServerSettings.max_sessions_per_client, help="Generation sessions per data party."
    ),
    max_session_bytes: int = typer.Option(
        ServerSettings.max_session_bytes, help="Memory cap of all sessions' KV caches."
    ),
    max_requests_per_client: int = typer.Option(
        ServerSettings.max_requests_per_client, help="Requests in flight per data party (429 beyond)."
    ),
    max_streams_per_session: int = typer.Option(
        ServerSettings.max_streams_per_session, help="Generation WebSockets per session (429 beyond)."
    ),
    max_streams_per_client: int = typer.Option(
        ServerSettings.max_streams_per_client, help="Generation WebSockets per data party (429 beyond)."
    ),
    max_connections: int = typer.Option(
        ServerSettings.max_connections, help="Connections served at once, all parties (503 beyond)."
    ),
    max_merged_rows: int = typer.Option(
        ServerSettings.max_merged_rows, help="Most rows of one merged generation forward, all parties."
    ),
    max_merged_keys: int = typer.Option(
        ServerSettings.max_merged_keys, help="Most rows x padded keys of one merged generation forward."
    ),
    device: str = typer.Option(ServerSettings.device, help="Torch device: cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option(
        ServerSettings.dtype, help="Compute dtype: auto (the checkpoint's own), fp32, bf16 or fp16."
    ),
    max_client_layers: int = typer.Option(
        ServerSettings.max_client_layers,
        help="Largest M a data party may keep at its end (U-shaped split, head=client): this server then "
        "runs layers [K, L - M) for it. Ship those layers with `emulate --client-layers M`.",
    ),
    access_log: bool = typer.Option(
        False, help="Log one line per request (off by default: a generation step is one request per token)."
    ),
) -> None:
    """Model party: serve layers [K, L), the norm and the head of MODEL to data parties, for split training
    and split generation (sessions under /v1/generate/sessions)."""
    import logging

    import uvicorn

    from splitprefix.model_party.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        model_dir=model,
        split_at=split_at,
        head=head,  # type: ignore[arg-type]  # checked in __post_init__
        host=host,
        port=port,
        tokens_file=tokens_file,
        insecure=insecure,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_request_bytes=max_request_bytes,
        max_batch_size=max_batch_size,
        max_tokens=max_tokens,
        graph_ttl_s=graph_ttl_s,
        max_graph_bytes=max_graph_bytes,
        max_graphs_per_client=max_graphs_per_client,
        session_ttl_s=session_ttl_s,
        max_sessions=max_sessions,
        max_sessions_per_client=max_sessions_per_client,
        max_session_bytes=max_session_bytes,
        max_requests_per_client=max_requests_per_client,
        max_streams_per_session=max_streams_per_session,
        max_streams_per_client=max_streams_per_client,
        max_connections=max_connections,
        max_merged_rows=max_merged_rows,
        max_merged_keys=max_merged_keys,
        device=device,
        dtype=dtype,  # type: ignore[arg-type]
        max_client_layers=max_client_layers,
    )
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
