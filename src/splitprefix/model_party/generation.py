"""The model party's side of split generation: prefill and one step per token on a session's cache.

Kept apart from the training paths of `TopBackend`, but it runs the same loaded layers [K, L), norm
and head, under the same lock. A session is opened by a prefill that carries the prefix for the
server's layers, which seeds its cache once; each step then sends only the new tokens' layer-K
hidden states. Only the last position of each row goes through the head, and with `top_k` only the
k best logits travel back, so a greedy step answers a few bytes per row.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from splitprefix.model.prefix import prefix_cache
from splitprefix.model.split import Activations
from splitprefix.model_party.backend import Tensors, TopBackend
from splitprefix.model_party.sessions import Session, SessionStore, cache_bytes
from splitprefix.model_party.validation import RequestError, StepMeta, check_meta, check_names
from splitprefix.wire import schemas


class ModelBusy(Exception):
    """A request that was not to wait found the model busy; nothing was changed."""


class GenerationBackend:
    """Generation sessions over the layers a `TopBackend` loaded."""

    def __init__(self, backend: TopBackend) -> None:
        self.backend = backend
        s = backend.settings
        self.sessions = SessionStore(
            s.session_ttl_s, s.max_sessions, s.max_sessions_per_client, s.max_session_bytes
        )

    def open(self, tensors: Tensors, meta: dict[str, Any], client_id: str) -> tuple[Tensors, dict[str, Any]]:
        """Prefill: seed a new session with `prefix_kv`, run the prompts, answer for their last position."""
        step = check_meta(meta, self.backend.shape, forward=True)
        check_names(tensors, [*schemas.GENERATE_INPUTS, schemas.PREFIX_KV], "generation open request")
        kv = _floating(tensors, schemas.PREFIX_KV)
        layers = self.backend.shape.kv_layers - step.client_layers  # [K, L - M)
        prefix_len = self._check_prefix(kv, layers)
        hidden, mask, positions = self._check_tokens(tensors)
        batch, length = mask.shape
        max_length, top_k = self._session_options(meta, step, prefix_len + length)
        b = self.backend
        if batch > b.settings.max_batch_size:
            raise RequestError(
                413,
                "limit_exceeded",
                f"batch size {batch} is over this server's limit of {b.settings.max_batch_size}; "
                "generate fewer prompts at once (see /v1/info limits)",
            )
        d = b.dims
        nbytes = cache_bytes(batch, max_length, layers, d.num_kv_heads, d.head_dim, b.dtype.itemsize)
        with b._lock:
            self.sessions.check_room(client_id, nbytes)
            kv = kv.to(b.settings.device, b.dtype)
            cache = (
                prefix_cache(kv, b.config, batch, b.settings.split_at)
                if prefix_len
                else DynamicCache(config=b.config)
            )
            prefix_mask = mask.new_ones(batch, prefix_len)
            session = Session(client_id, step.head, top_k, cache, prefix_mask, max_length, nbytes)
            session.client_layers = step.client_layers
            out = self._run(session, hidden, mask, positions)
            self.sessions.add(session)
        return out, step.reply(session_id=session.session_id, length=session.length)

    def step(
        self, session_id: str, tensors: Tensors, meta: dict[str, Any], client_id: str, wait: bool = True
    ) -> tuple[Tensors, dict[str, Any]]:
        """One decoding step (or a chunk of tokens) on the client's session.

        A step with the step_id of the session's last step is answered with that step's answer and
        not run again, so that a client may retry a request whose answer it lost. With `wait=False`
        it raises `ModelBusy`, having changed nothing, when another request holds the model, instead
        of waiting for it."""
        step = check_meta(meta, self.backend.shape, forward=False)
        implicit = set(tensors) == {"hidden"}  # one real token per row, right after the last
        if not implicit:
            check_names(tensors, list(schemas.GENERATE_INPUTS), "generation step request")
        if not self.backend._lock.acquire(blocking=wait):
            raise ModelBusy("the model is serving another request")
        try:
            session = self.sessions.get(client_id, session_id)
            if session.last_step is not None and session.last_step[0] == step.step_id:
                # a retry of a step whose answer was lost on the way: running it again would extend
                # the cache twice, so the same answer is sent again
                return session.last_step[1], step.reply(session_id=session.session_id, length=session.length)
            if implicit:
                assert session.next_positions is not None  # set by the prefill
                ones = torch.ones(session.batch_size, 1, dtype=torch.long)
                tensors = tensors | {"token_mask": ones, "positions": session.next_positions}
            hidden, mask, positions = self._check_tokens(tensors)
            if step.head != session.head:
                raise RequestError(
                    422, "invalid_meta", f"session {session_id!r} was opened with head={session.head}"
                )
            if mask.shape[0] != session.batch_size:
                raise RequestError(
                    422,
                    "bad_tensor",
                    f"session {session_id!r} holds {session.batch_size} rows; this step sends {mask.shape[0]}",
                )
            if session.length + mask.shape[1] > session.max_length:
                raise RequestError(
                    413,
                    "limit_exceeded",
                    f"session {session_id!r} may hold {session.max_length} keys per row (its max_length); it "
                    f"holds {session.length} and this step adds {mask.shape[1]}. Open a longer session",
                )
            try:
                out = self._run(session, hidden, mask, positions)
            except Exception:
                self.sessions.close(client_id, session_id)  # its cache may be half extended
                raise
            session.last_step = (step.step_id, out)
        finally:
            self.backend._lock.release()
        return out, step.reply(session_id=session.session_id, length=session.length)

    def check_session(self, session_id: str, client_id: str) -> None:
        """404 `session_missing` unless the client holds this live session (as a step would check)."""
        with self.backend._lock:
            self.sessions.get(client_id, session_id)

    def close(self, session_id: str, client_id: str) -> dict[str, Any]:
        with self.backend._lock:
            self.sessions.close(client_id, session_id)
        return {"session_id": session_id, "closed": True}

    @torch.inference_mode()
    def _run(
        self, session: Session, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> Tensors:
        """Extend the session by the new tokens; the answer for each row's last position (for every
        new position, with client layers: `output` (B, T, d) after layer L - M).

        Inference mode (no autograd bookkeeping at all) because a session's tensors never meet a
        backward; it saves a little on each of the step's many small operations."""
        b = self.backend
        device = b.settings.device
        full_mask = torch.cat([session.mask, mask], dim=1)  # (B, S + T)
        x = Activations(hidden.to(device, b.dtype), full_mask.to(device), positions.to(device))
        hidden = b.stacks[session.client_layers](x, session.cache)  # (B, T, d)
        session.mask = full_mask
        session.next_positions = positions[:, -1:] + 1  # (B, 1)
        if session.client_layers:
            return {schemas.OUTPUT: hidden}
        last = hidden[:, -1]  # (B, d)
        if session.head == "client":
            return {schemas.LAST_HIDDEN: last}
        logits = b.top.head(last)  # (B, V)
        if session.top_k == 0:
            return {schemas.LOGITS: logits}
        values, indices = torch.topk(logits, min(session.top_k, logits.shape[-1]), dim=-1)  # (B, k)
        return {schemas.TOP_VALUES: values, schemas.TOP_INDICES: indices}

    def _check_prefix(self, kv: torch.Tensor, layers: int) -> int:
        d = self.backend.dims
        if kv.ndim != 5 or (kv.shape[:3], kv.shape[4]) != ((layers, 2, d.num_kv_heads), d.head_dim):
            raise RequestError(
                422,
                "bad_tensor",
                f"prefix_kv must have shape (L - M - K, 2, n_kv, P, head_dim) = ({layers}, 2, "
                f"{d.num_kv_heads}, P, {d.head_dim}); got {tuple(kv.shape)}",
            )
        return int(kv.shape[3])

    def _check_tokens(self, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = _floating(tensors, "hidden")
        d = self.backend.dims.hidden_size
        if hidden.ndim != 3 or hidden.shape[2] != d or 0 in hidden.shape[:2]:
            raise RequestError(
                422,
                "bad_tensor",
                f"hidden must have shape (B, T, {d}) with B, T >= 1; got {tuple(hidden.shape)}",
            )
        shape = tuple(hidden.shape[:2])
        out = []
        for name in ("token_mask", "positions"):
            tensor = tensors[name]
            if tensor.is_floating_point() or tuple(tensor.shape) != shape:
                raise RequestError(
                    422,
                    "bad_tensor",
                    f"{name} must be an integer tensor of shape (B, T) = {shape}; got {tensor.dtype} "
                    f"{tuple(tensor.shape)}",
                )
            out.append(tensor.long())
        mask, positions = out
        if ((mask != 0) & (mask != 1)).any() or (positions < 0).any():
            raise RequestError(422, "bad_tensor", "token_mask must hold only 0 and 1, and positions be >= 0")
        return hidden, mask, positions

    def _session_options(self, meta: dict[str, Any], step: StepMeta, needed: int) -> tuple[int, int]:
        """`max_length` (keys per row the session may reach) and `top_k` from the open request."""
        limit = self.backend.settings.max_tokens
        max_length = meta.get("max_length")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not needed <= max_length:
            raise RequestError(
                422,
                "invalid_meta",
                f"metadata field 'max_length' must be an integer >= P + T = {needed} (the prefix, the "
                f"prompt and every token to generate); got {max_length!r}",
            )
        if max_length > limit:
            raise RequestError(
                413,
                "limit_exceeded",
                f"max_length {max_length} is over this server's limit of {limit} keys per row (max_tokens "
                "in /v1/info); generate fewer tokens or use a shorter prompt",
            )
        top_k = meta.get("top_k", 0)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise RequestError(
                422, "invalid_meta", f"metadata field 'top_k' must be an integer >= 0; got {top_k!r}"
            )
        if top_k and step.head == "client":
            raise RequestError(
                422, "invalid_meta", "top_k applies to head=server; with head=client you apply the head"
            )
        return max_length, top_k


def _floating(tensors: Tensors, name: str) -> torch.Tensor:
    tensor = tensors[name]
    if not tensor.is_floating_point():
        raise RequestError(422, "bad_tensor", f"{name} must be a floating tensor; got {tensor.dtype}")
    return tensor
