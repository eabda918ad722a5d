"""The gateway's settings: its API key and the limits of one request (see `gateway_guard`).

Apart from the guard itself, so that the CLI reads the defaults without importing the web stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitprefix.errors import ConfigError

MiB = 1024 * 1024


@dataclass
class GatewaySettings:
    """Who may use the gateway and how much one request may ask of it."""

    api_key: str | None = None
    """Key clients must send as `Authorization: Bearer <key>`; None lets anyone in (loopback only)."""
    max_tokens_limit: int = 1024
    """Largest `max_tokens` (or `max_completion_tokens`) a request may ask for (400 beyond)."""
    max_prompt_tokens: int = 2048
    """Largest prompt, in tokens after the chat layout, per prompt (400 beyond)."""
    max_prompts: int = 8
    """Prompts one completions request may batch (400 beyond)."""
    max_concurrent: int = 4
    """Requests in flight at once, streams included; requests wait for the model in turn (429 beyond)."""
    max_request_bytes: int = 1 * MiB
    """Largest request body, in bytes (413 beyond, checked before it is read)."""

    def __post_init__(self) -> None:
        for name in (
            "max_tokens_limit",
            "max_prompt_tokens",
            "max_prompts",
            "max_concurrent",
            "max_request_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; give a key, or none for a loopback-only gateway")


API_KEY_ENV = "SPLITPREFIX_GATEWAY_API_KEY"


def read_api_key(key: str | None, key_file: Path | None) -> str | None:
    """The gateway's API key from `--api-key` (or the environment) or from a file, never both."""
    if key is not None and key_file is not None:
        raise ConfigError(f"give the API key once: --api-key (or ${API_KEY_ENV}) or --api-key-file, not both")
    if key_file is None:
        return key
    text = Path(key_file).read_text().strip()
    if not text:
        raise ConfigError(f"API key file {key_file} is empty")
    return text
