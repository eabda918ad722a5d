"""The model party's side of split generation: prefill and one step per token on a session's cache.

Kept apart from the training paths of `TopBackend`, but it runs the same loaded layers [K, L), norm
and head, on the same scheduler (`model_party.scheduler`), which merges concurrent steps of
different sessions into one forward (`model_party.merged`). A session is opened by a prefill that carries the prefix for the
server's layers, which seeds its cache once; each step then sends only the new tokens' layer-K
hidden states. Only the last position of each row goes through the head, and with `top_k` only the
k best logits travel back, so a greedy step answers a few bytes per row.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

import torch

from splitprefix.model_party.backend import Tensors, TopBackend
from splitprefix.model_party.merged import StepWork, prefill, run_steps
from splitprefix.model_party.scheduler import Done, Job
from splitprefix.model_party.session_cache import SessionCache
from splitprefix.model_party.sessions import Session, SessionStore, cache_bytes
from splitprefix.model_party.validation import RequestError, StepMeta, check_meta, check_names
from splitprefix.wire import schemas


class GenerationBackend:
    """Generation sessions over the layers a `TopBackend` loaded, run by its scheduler."""

    def __init__(self, backend: TopBackend) -> None:
        self.backend = backend
        s = backend.settings
        self.sessions = SessionStore(
            s.session_ttl_s, s.max_sessions, s.max_sessions_per_client, s.max_session_bytes
        )
        self.scheduler = backend.scheduler
        self.scheduler.merge = self._merge

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

        def run() -> tuple[Tensors, Session]:
            self.sessions.check_room(client_id, nbytes)
            device = b.settings.device
            cache = SessionCache(d, b.settings.split_at, layers, (batch, max_length), b.dtype, device)
            session = Session(client_id, step.head, top_k, cache, cache.mask, max_length, nbytes)
            session.client_layers = step.client_layers
            out = prefill(b, session, kv.to(device, b.dtype), StepWork(session, hidden, mask, positions))
            self.sessions.add(session)
            return out, session

        (out, session), queued = self.scheduler.submit(Job(client_id, urgent=True, run=run))
        return out, step.reply(session_id=session.session_id, length=session.length, queue_ms=_ms(queued))

    def step(
        self, session_id: str, tensors: Tensors, meta: dict[str, Any], client_id: str
    ) -> tuple[Tensors, dict[str, Any]]:
        """One decoding step (or a chunk of tokens) on the client's session, merged by the scheduler
        with other sessions' steps.

        A step with the step_id of the session's last step is answered with that step's answer and
        not run again, so that a client may retry a request whose answer it lost."""
        job, step = self._step_job(session_id, tensors, meta, client_id)
        (out, length), queued = self.scheduler.submit(job)
        return out, step.reply(session_id=session_id, length=length, queue_ms=_ms(queued))

    async def step_async(
        self, session_id: str, tensors: Tensors, meta: dict[str, Any], client_id: str
    ) -> tuple[Tensors, dict[str, Any]]:
        """`step` for the event loop: the loop waits for the worker without a thread of its own,
        which spares a small step two thread switches (a large share of its time on 2 cores)."""
        job, step = self._step_job(session_id, tensors, meta, client_id)
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(_resolve, finished)

        job.on_done = wake
        self.scheduler.enqueue(job)
        await finished
        if job.error is not None:
            raise job.error
        out, length = job.result
        return out, step.reply(session_id=session_id, length=length, queue_ms=_ms(job.queue_s))

    def _step_job(
        self, session_id: str, tensors: Tensors, meta: dict[str, Any], client_id: str
    ) -> tuple[Job, StepMeta]:
        step = check_meta(meta, self.backend.shape, forward=False)
        if set(tensors) != {"hidden"}:  # hidden alone: one real token per row, right after the last
            check_names(tensors, list(schemas.GENERATE_INPUTS), "generation step request")
        prepare = partial(self._prepare, session_id, tensors, step, client_id)
        return Job(client_id, urgent=True, prepare=prepare), step

    def _prepare(self, session_id: str, tensors: Tensors, step: StepMeta, client_id: str) -> StepWork:
        """The step checked against the session as it is now (on the scheduler's thread)."""
        session = self.sessions.get(client_id, session_id)
        if session.last_step is not None and session.last_step[0] == step.step_id:
            # a retry of a step whose answer was lost on the way: running it again would extend
            # the cache twice, so the same answer is sent again
            raise Done((session.last_step[1], session.length))
        if set(tensors) == {"hidden"}:
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
        return StepWork(session, hidden, mask, positions, step.step_id)

    def _merge(self, works: list[StepWork]) -> list[tuple[Tensors, int]]:
        """Run the prepared steps as one forward; each one's answer and its session's new length."""
        try:
            outs = run_steps(self.backend, works)
        except Exception:
            for work in works:  # their caches may be half extended
                with contextlib.suppress(RequestError):
                    self.sessions.close(work.session.owner, work.session.session_id)
            raise
        for work, out in zip(works, outs, strict=True):
            work.session.last_step = (work.step_id, out)
        return [(out, work.session.length) for work, out in zip(works, outs, strict=True)]

    def check_session(self, session_id: str, client_id: str) -> None:
        """404 `session_missing` unless the client holds this live session (as a step would check)."""
        run = partial(self.sessions.get, client_id, session_id)
        self.scheduler.submit(Job(client_id, urgent=True, run=run, quick=True))

    def close(self, session_id: str, client_id: str) -> dict[str, Any]:
        def run() -> None:
            self.scheduler.forget(self.sessions.close(client_id, session_id))

        self.scheduler.submit(Job(client_id, urgent=True, run=run, quick=True))
        return {"session_id": session_id, "closed": True}

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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a request cancelled meanwhile has no one to wake
        future.set_result(None)


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 3)


def _floating(tensors: Tensors, name: str) -> torch.Tensor:
    tensor = tensors[name]
    if not tensor.is_floating_point():
        raise RequestError(422, "bad_tensor", f"{name} must be a floating tensor; got {tensor.dtype}")
    return tensor
