"""Generation sessions: the KV caches of the server's layers, one per batch of prompts being generated.

A session belongs to the data party whose token opened it, is dropped after `ttl_s` idle seconds,
and reserves its cache's largest size (batch x `max_length` keys) when it opens, so that the caps
on count and memory hold for its whole life. A full store refuses new sessions with 429 (this party
holds its share) or 503 (the server is full), and never evicts a live session to make room:
another party's generation would break. A lost session costs only a prefill: the client opens a
new one with every token so far. Expiry is checked on every access to the store, so an idle server
keeps at most the reserved memory until the next request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from splitprefix.model_party.session_cache import SessionCache
from splitprefix.model_party.validation import RequestError
from splitprefix.wire.schemas import SESSION_MISSING, HeadMode


@dataclass
class Session:
    """One batch being generated: the cache of layers [K, L) and the mask of every cached key."""

    owner: str
    """The data party (token) that opened it; nobody else may use it."""
    head: HeadMode
    """What each step returns: logits or top-k (server), or the last hidden state (client)."""
    top_k: int
    """head=server: 0 returns full logits, k > 0 only the k best."""
    cache: SessionCache
    """Keys and values of layers [K, L): the prefix, then every token so far (preallocated)."""
    mask: torch.Tensor
    """(B, S): 1 for every cached key that tokens may attend to (prefix and real tokens); a view
    of the cache's mask."""
    max_length: int
    """Most keys per row the session may hold (prefix included); its memory is reserved for this."""
    reserved_bytes: int
    """Memory counted against the store's cap."""
    next_positions: torch.Tensor | None = None
    """(B, 1): the position of each row's next token, for steps that send hidden states only."""
    client_layers: int = 0
    """M: the data party keeps layers [L - M, L); this session runs [K, L - M) and answers the hidden
    states of every new token (the party's own top layers need them all)."""
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    last_used: float = 0.0
    last_step: tuple[str, dict[str, torch.Tensor]] | None = None
    """(step_id, answer) of the last step, replayed when that step comes again (a retried request)."""

    @property
    def length(self) -> int:
        """Keys cached per row, prefix included."""
        return int(self.mask.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])


def cache_bytes(batch: int, length: int, layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of keys and values for `layers` layers of `batch` rows of `length` keys."""
    return batch * length * layers * 2 * kv_heads * head_dim * itemsize


class SessionStore:
    """Open sessions keyed by id, capped in count (overall and per party) and reserved memory."""

    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        max_per_client: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_sessions, self.max_per_client = ttl_s, max_sessions, max_per_client
        self.max_bytes = max_bytes
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self.expired = 0

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self._sessions.values())

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def check_room(self, owner: str, nbytes: int) -> None:
        """Raise 429 or 503 unless a session of `nbytes` from `owner` fits now."""
        self._expire()
        own = sum(1 for s in self._sessions.values() if s.owner == owner)
        if own >= self.max_per_client:
            raise RequestError(
                429,
                "too_many_sessions",
                f"you hold {own} generation sessions, this server's limit per data party "
                f"({self.max_per_client}); close finished ones (DELETE the session) or wait for them to "
                f"expire after {self.ttl_s:g} idle seconds",
            )
        if len(self._sessions) >= self.max_sessions:
            raise RequestError(
                503,
                "server_full",
                f"the server holds its maximum of {self.max_sessions} generation sessions; retry later",
            )
        if self.reserved_bytes + nbytes > self.max_bytes:
            raise RequestError(
                503,
                "server_full",
                f"a session of this batch and max_length needs {nbytes} bytes of KV cache; the server has "
                f"{max(0, self.max_bytes - self.reserved_bytes)} of its {self.max_bytes} left. Retry later, "
                "or ask for fewer rows or a smaller max_length",
            )

    def add(self, session: Session) -> Session:
        """Hold `session` (after `check_room`)."""
        session.last_used = self._clock()
        self._sessions[session.session_id] = session
        return session

    def get(self, owner: str, session_id: str) -> Session:
        """The owner's live session, or 404 `session_missing` (also for another party's session)."""
        self._expire()
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise RequestError(
                404,
                SESSION_MISSING,
                f"no generation session {session_id[:40]!r} for you (it expired after {self.ttl_s:g} idle "
                "seconds, the server restarted, or it was never yours); open a new session with the "
                "prefix and every token so far",
            )
        session.last_used = self._clock()
        return session

    def close(self, owner: str, session_id: str) -> Session:
        """Drop the owner's session (404 if it is not the owner's); the session dropped."""
        session = self.get(owner, session_id)
        del self._sessions[session_id]
        return session

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        for key in [key for key, s in self._sessions.items() if s.last_used <= deadline]:
            del self._sessions[key]
            self.expired += 1
