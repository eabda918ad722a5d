"""Bearer tokens, one per data party, read from a tokens file.

The tokens file is either a JSON object mapping party names to tokens:

    {"hospital-a": "3f9c...e1", "bank-b": "77ab...04"}

or plain text, one `party-name token` pair per line, with blank lines and `#` comments ignored:

    # party      token
    hospital-a   3f9c...e1
    bank-b       77ab...04

A request sends `Authorization: Bearer <token>`; the party's name becomes its client id, which
keeps its held graphs apart from other parties'. Without a tokens file authentication is off and
every request is the client "anonymous". Generate tokens with `python -c "import secrets;
print(secrets.token_urlsafe(32))"`.
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path

from splitprefix.errors import ConfigError

logger = logging.getLogger(__name__)
ANONYMOUS = "anonymous"
MIN_TOKEN_CHARS = 16


class Unauthorized(Exception):
    """The request has no valid bearer token; answered with 401 and `WWW-Authenticate: Bearer`."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def read_tokens_file(path: str | Path) -> dict[str, str]:
    """Party name -> token from a JSON or `name token` lines file; ConfigError says what is wrong."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"tokens file {path} is not valid JSON: {error}") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise ConfigError(f"tokens file {path} must map party names to token strings")
        tokens: dict[str, str] = raw
    else:
        tokens = {}
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ConfigError(f"{path}:{number}: expected 'party-name token'; got {len(fields)} fields")
            if fields[0] in tokens:
                raise ConfigError(f"{path}:{number}: party {fields[0]!r} is listed twice")
            tokens[fields[0]] = fields[1]
    _check_tokens(tokens, path)
    return tokens


def _check_tokens(tokens: dict[str, str], path: str | Path) -> None:
    if not tokens:
        raise ConfigError(f"tokens file {path} lists no parties; remove --tokens-file to turn auth off")
    if any(not name or not token.strip() for name, token in tokens.items()):
        raise ConfigError(f"tokens file {path} has an empty party name or token")
    if len(set(tokens.values())) != len(tokens):
        raise ConfigError(f"tokens file {path} gives two parties the same token; each needs its own")
    short = sorted(name for name, token in tokens.items() if len(token) < MIN_TOKEN_CHARS)
    if short:
        logger.warning(
            "tokens of %s are shorter than %d characters and easy to guess", short, MIN_TOKEN_CHARS
        )


class TokenAuth:
    """Maps an `Authorization` header to a party name; `tokens=None` turns authentication off."""

    def __init__(self, tokens: dict[str, str] | None) -> None:
        self._tokens = None if tokens is None else [(n, t.encode()) for n, t in tokens.items()]

    @classmethod
    def from_file(cls, path: str | Path | None) -> TokenAuth:
        return cls(None if path is None else read_tokens_file(path))

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    def client_id(self, authorization: str | None) -> str:
        """The party that sent `authorization`, or Unauthorized with what to do."""
        if self._tokens is None:
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("this server needs a bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        sent = token.strip().encode()
        party = None
        for name, known in self._tokens:
            # compare with every token, so the time taken does not reveal which one nearly matched
            if hmac.compare_digest(sent, known):
                party = name
        if party is None:
            raise Unauthorized("the bearer token is not valid; ask the model party for your token")
        return party
