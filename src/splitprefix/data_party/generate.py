"""Split inference on the data party's side: `SplitModel.generate` over the model party's sessions.

The data party tokenizes, runs the embeddings and layers [0, K) with its own KV cache and the bottom
slice of its prefix, and sends only layer-K hidden states: the whole prompt batch once (the prefill,
which also carries the prefix for the server's layers and opens a session), then one hidden state
per row and token. The server answers each row's next-token logits (or only the best few, or the
last hidden state with head=client), and the next token is chosen here. Text, token ids and the
prefix's bottom slice never leave. With the U-shaped split (client_layers M > 0) the server runs
[K, L - M) and answers the states of every new token after layer L - M; the top M layers run here
with their own cache and prefix slice, which never leaves either.

Steps travel over a WebSocket per session when the server offers one, else one HTTP request each
(`data_party.steps`). If the server has lost the session (restart, idle expiry), the next step
answers 404 `session_missing` (or its socket failed after the step left, so that the session's
state is unknown); the client opens a new session with the layer-K hidden states of every token so
far, which it keeps, and carries on: the output is the same as without the loss.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from splitprefix.data.batching import Batch, resolve_pad_id
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings, RemoteError, SplitClient
from splitprefix.data_party.sampling import GenerationConfig, next_tokens
from splitprefix.data_party.session import SplitSession, open_split
from splitprefix.data_party.split_forward import bottom_device, bottom_dtype
from splitprefix.data_party.steps import STEP_LOST, StepTransport, open_steps
from splitprefix.errors import ConfigError
from splitprefix.evaluation.evaluate import Scorer
from splitprefix.model.decoding import decode
from splitprefix.model.prefix import Prefix, prefix_cache
from splitprefix.model.split import Activations, Bottom, Head, extend_mask, token_positions
from splitprefix.runtime import RuntimeSettings
from splitprefix.wire import schemas

__all__ = ["Completion", "GenerationConfig", "SplitModel"]


@dataclass
class Completion:
    """One prompt's generated text."""

    text: str
    """The new text, cut before a stop string."""
    token_ids: list[int]
    """The new tokens, EOS included when one ended the row."""
    finish_reason: str = "length"
    """'stop' (EOS or a stop string) or 'length' (max_new_tokens reached)."""


@dataclass
class _Session:
    """One server session and what reopening it needs: everything sent so far."""

    session_id: str = ""
    hidden: list[torch.Tensor] = field(default_factory=list)  # chunks (B, T_i, d), as sent
    mask: list[torch.Tensor] = field(default_factory=list)  # chunks (B, T_i)
    positions: list[torch.Tensor] = field(default_factory=list)  # chunks (B, T_i)
    steps: StepTransport | None = None
    """How this session's steps travel (a socket or HTTP); replaced when the session is reopened."""
    top_cache: DynamicCache | None = None
    """The U-shaped split: this party's cache of its top layers [L - M, L) (prefix, then tokens)."""
    top_done: int = 0
    """Tokens per row that the top layers here have already run (a reopened session resends them)."""


class SplitModel:
    """The data party's half of the split model, generating text through the model party's server."""

    def __init__(self, split: SplitSession, kv: torch.Tensor | None = None) -> None:
        """`kv`: the full model's prefix (L, 2, n_kv, P, hd); None generates with the base model."""
        self.split = split
        self.kv = kv if kv is not None else split.empty_kv()
        self.tokenizer: PreTrainedTokenizerBase = split.tokenizer
        config = split.bottom.stack.config
        self.pad_id = resolve_pad_id(self.tokenizer)
        eos = config.eos_token_id if config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long)  # for torch.isin at each step
        self.recoveries = 0
        """Sessions the server lost and this client reopened."""

    @classmethod
    def open(
        cls,
        emulator_dir: str | Path,
        settings: ClientSettings,
        prefix_dir: str | Path | None = None,
        privacy: PrivacyConfig | None = None,
        runtime: RuntimeSettings = RuntimeSettings(),
    ) -> SplitModel:
        """Load the emulator's bottom (and head) on `runtime`'s device and dtype, connect to the
        server, and load a full-layout prefix.

        With `privacy` enabled, every hidden state sent is clipped and noised (`privatize`).
        """
        split = open_split(emulator_dir, settings, privacy, runtime)
        try:
            kv = None
            if prefix_dir is not None:
                prefix = Prefix.load(prefix_dir)
                split.check_prefix(prefix, f"the prefix in {prefix_dir}")
                with torch.no_grad():
                    kv = prefix().detach()
        except BaseException:
            split.close()
            raise
        return cls(split, kv)

    @property
    def client(self) -> SplitClient:
        return self.split.client

    @property
    def bottom(self) -> Bottom:
        return self.split.bottom

    @property
    def head(self) -> Head | None:
        return self.split.head

    def close(self) -> None:
        self.split.close()

    def __enter__(self) -> SplitModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- text -----------------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[str],
        config: GenerationConfig | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Complete each prompt; `on_text(row, new_text)` streams text as it is generated."""
        rows: list[_RowText] = []
        for row, delta in self.stream(prompts, config, rows):
            if on_text is not None:
                on_text(row, delta)
        return [r.completion() for r in rows]

    def stream(
        self,
        prompts: str | list[str],
        config: GenerationConfig | None = None,
        rows: list[_RowText] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """(row, new text) pieces as tokens arrive; text that may start a stop string is held back."""
        config = config or GenerationConfig()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.encode(prompts)
        state = rows if rows is not None else []
        state[:] = [_RowText(self.tokenizer, config, self.eos_ids) for _ in prompts]
        tokens = self.iter_tokens(ids, mask, config)
        try:
            for token in tokens:
                for row, (text, tid) in enumerate(zip(state, token.tolist(), strict=True)):
                    delta = text.add(tid)
                    if delta:
                        yield row, delta
                if all(r.done for r in state):
                    break
            for row, text in enumerate(state):
                delta = text.finish()
                if delta:
                    yield row, delta
        finally:
            tokens.close()

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids (B, T) and token mask (B, T); an empty prompt starts from BOS."""
        if not prompts:
            raise ConfigError("give at least one prompt")
        rows = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        bos = self.tokenizer.bos_token_id
        rows = [r or ([bos] if bos is not None else []) for r in rows]
        if any(not r for r in rows):
            raise ConfigError("an empty prompt needs a tokenizer with a BOS token; give some text")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return ids, mask

    # --- tokens ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(
        self, input_ids: torch.Tensor, token_mask: torch.Tensor, config: GenerationConfig | None = None
    ) -> torch.Tensor:
        """New tokens (B, <= max_new_tokens) of left-padded prompts; rows past EOS hold the pad id.

        With greedy decoding this equals the whole model's `generate_with_prefix`.
        """
        tokens = list(self.iter_tokens(input_ids, token_mask, config or GenerationConfig()))
        return torch.stack(tokens, dim=1).cpu()

    @torch.no_grad()
    def iter_tokens(
        self, input_ids: torch.Tensor, token_mask: torch.Tensor, config: GenerationConfig
    ) -> Generator[torch.Tensor, None, None]:
        """Each step's next tokens (B,), until max_new_tokens or every row has produced EOS."""
        if input_ids.shape != token_mask.shape or not bool(token_mask[:, -1].all()):
            raise ConfigError("prompts must be left-padded: token_mask (B, T) like input_ids, last column 1")
        batch, p = input_ids.shape[0], self.kv.shape[3]
        device = bottom_device(self.bottom)
        input_ids, token_mask, eos = input_ids.to(device), token_mask.to(device), self._eos.to(device)
        generator = config.generator(device)
        cache = self._bottom_cache(batch)
        bottom_mask = extend_mask(token_mask, p)  # (B, P + T)
        positions = token_positions(token_mask, p)  # (B, T)
        session = _Session(top_cache=self._top_cache(batch))
        max_length = p + input_ids.shape[1] + config.max_new_tokens
        x = self.bottom(input_ids, bottom_mask, positions, cache)
        answer = self._open(
            session, self._outgoing(x.hidden, token_mask), token_mask, positions, max_length, config
        )
        state = {"mask": bottom_mask, "position": positions[:, -1:] + 1}  # (B, P + T), (B, 1)

        def advance(token: torch.Tensor) -> dict[str, torch.Tensor]:
            ones = token_mask.new_ones(batch, 1)
            state["mask"] = torch.cat([state["mask"], ones], dim=1)
            x = self.bottom(token[:, None], state["mask"], state["position"], cache)
            hidden = self._outgoing(x.hidden, ones)
            answer = self._step(session, hidden, ones, state["position"], max_length, config)
            state["position"] = state["position"] + 1
            return answer

        def choose(answer: dict[str, torch.Tensor]) -> torch.Tensor:
            return next_tokens(*self._scores(answer, session), config, generator)

        stop = eos if config.stop_at_eos and self.eos_ids else None
        try:
            yield from decode(answer, advance, choose, config.max_new_tokens, self.pad_id, stop)
        finally:
            self._close(session)

    def _outgoing(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Every layer-K hidden state (B, T, d) passes here before it leaves: clipped and noised when the
        session has a privacy option, else unchanged. `token_mask` (B, T) is 1 on real tokens."""
        privacy = self.split.privacy
        return hidden if privacy is None else privacy(hidden, token_mask)

    def _bottom_cache(self, batch: int) -> DynamicCache:
        config, split_at = self.bottom.stack.config, self.split.split_at
        if self.kv.shape[3]:
            kv = self.kv[:split_at].to(bottom_device(self.bottom), bottom_dtype(self.bottom))
            return prefix_cache(kv, config, batch)
        return DynamicCache(config=config)

    def _top_cache(self, batch: int) -> DynamicCache | None:
        """The U-shaped split's cache of the top layers kept here, seeded with their prefix."""
        top = self.split.client_top
        if top is None or not top.client_layers:
            return None
        if self.kv.shape[3]:
            kv = self.kv[self.kv.shape[0] - top.client_layers :].to(
                bottom_device(self.bottom), bottom_dtype(self.bottom)
            )
            return prefix_cache(kv, top.stack.config, batch, first_layer=top.start)
        return DynamicCache(config=top.stack.config)

    def _run_top(self, hidden: torch.Tensor, session: _Session) -> torch.Tensor:
        """h_L (B, d) at the last position: the top layers here run the tokens they have not run yet,
        whose states h_{L-M} end `hidden` (B, T, d); earlier ones a reopened session sent again."""
        top = self.split.client_top
        assert top is not None and session.top_cache is not None
        device, dtype = bottom_device(self.bottom), bottom_dtype(self.bottom)
        mask, positions = torch.cat(session.mask, dim=1), torch.cat(session.positions, dim=1)  # (B, T_all)
        new = mask.shape[1] - session.top_done
        x = Activations(
            hidden[:, -new:].to(device, dtype),
            extend_mask(mask, self.kv.shape[3]).to(device),
            positions[:, -new:].to(device),
        )
        session.top_done = mask.shape[1]
        return top.stack(x, session.top_cache)[:, -1]  # (B, d)

    def _scores(
        self, answer: dict[str, torch.Tensor], session: _Session
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores, token ids or None for the whole vocabulary) from a server answer."""
        device = bottom_device(self.bottom)
        top = self.split.client_top
        if schemas.OUTPUT in answer and top is not None and top.client_layers:
            return top.head(self._run_top(answer[schemas.OUTPUT], session)), None
        if schemas.LAST_HIDDEN in answer:
            assert self.head is not None
            hidden = answer[schemas.LAST_HIDDEN].to(device, bottom_dtype(self.bottom))  # (B, d)
            return self.head(hidden), None  # (B, V)
        if schemas.LOGITS in answer:
            return answer[schemas.LOGITS].to(device), None
        return answer[schemas.TOP_VALUES].to(device), answer[schemas.TOP_INDICES].to(device)

    # --- server session -------------------------------------------------------------------------

    def _open(
        self,
        session: _Session,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        max_length: int,
        config: GenerationConfig,
    ) -> dict[str, torch.Tensor]:
        session.hidden, session.mask, session.positions = [hidden], [mask], [positions]
        return self._reopen(session, max_length, config)

    def _reopen(
        self, session: _Session, max_length: int, config: GenerationConfig
    ) -> dict[str, torch.Tensor]:
        """Open a session with the prefix and every token so far; the answer for the last ones."""
        tensors = {
            "hidden": torch.cat(session.hidden, dim=1),  # (B, T, d)
            "token_mask": torch.cat(session.mask, dim=1),  # (B, T)
            "positions": torch.cat(session.positions, dim=1),  # (B, T)
            schemas.PREFIX_KV: self.kv[
                self.split.split_at : self._server_stop()
            ],  # (L - M - K, 2, n_kv, P, hd)
        }
        top_k = config.server_top_k if self.client.settings.head == "server" else 0
        meta = self.client.request_meta(uuid.uuid4().hex) | {"max_length": max_length, "top_k": top_k}
        out, reply = self.client.call(schemas.SESSIONS_PATH, tensors, meta)
        session.session_id = str(reply.get("session_id", ""))
        if session.steps is not None:
            session.steps.close()
        session.steps = open_steps(self.client, session.session_id)
        return out

    def _step(
        self,
        session: _Session,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        max_length: int,
        config: GenerationConfig,
    ) -> dict[str, torch.Tensor]:
        session.hidden.append(hidden)
        session.mask.append(mask)
        session.positions.append(positions)
        meta = self.client.request_meta(str(len(session.hidden)), with_identity=False)
        assert session.steps is not None  # set by the prefill
        try:
            # one real token per row, right after its last: the server knows the mask and position
            return session.steps.step({"hidden": hidden}, meta)[0]
        except RemoteError as error:
            if error.code not in (schemas.SESSION_MISSING, STEP_LOST):
                raise
            if error.code == STEP_LOST:
                self._close(session)  # it may still hold the step: free it, start afresh
            self.recoveries += 1  # restart, expiry or a lost answer: prefill again, transparently
            return self._reopen(session, max_length, config)

    def _server_stop(self) -> int:
        """L - M: the layers from there on, and their prefix, stay here (M = 0: none do)."""
        return self.kv.shape[0] - self.split.client_layers

    def _close(self, session: _Session) -> None:
        """Free the server's cache now rather than at its expiry; a failure here changes nothing."""
        if session.steps is not None:
            session.steps.close()
            session.steps = None
        if not session.session_id:
            return
        # already gone (expired, restarted), or the server is down: then it expires anyway
        with contextlib.suppress(RemoteError):
            self.client.delete(schemas.SESSION_PATH.format(session_id=session.session_id))


class _RowText:
    """One row's text as tokens arrive: EOS and stop strings end it; stop-string starts are held back."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: GenerationConfig, eos: set[int]) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, config.stop, eos if config.stop_at_eos else set()
        self.ids: list[int] = []
        self.text, self.emitted, self.done, self.reason = "", 0, False, "length"

    def add(self, token: int) -> str:
        """Take one token; the text that is now safe to show."""
        if self.done:
            return ""
        self.ids.append(token)
        if token in self.eos:
            self.done, self.reason = True, "stop"
            return ""
        self.text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.done, self.reason = self.text[:cut], True, "stop"
            return self._emit(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(self.text) - hold
        if self.text.endswith("\ufffd"):  # half of a multi-byte character
            safe = min(safe, len(self.text) - 1)
        return self._emit(safe)

    def finish(self) -> str:
        """The text held back, once the row is over."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta

    def completion(self) -> Completion:
        return Completion(self.text, list(self.ids), self.reason)


def split_scorer(session: SplitSession) -> Scorer:
    """The split model for evaluation: batched loss through the server (head=server sends the
    targets; nothing of size V crosses the wire), and the KV-cached split generation."""
    loss = session.loss_fn()

    @torch.no_grad()
    def loss_sum(batch: Batch, kv: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        return loss(batch, session.empty_kv() if kv is None else kv)

    @torch.no_grad()
    def generate(ids: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None, new: int) -> torch.Tensor:
        return SplitModel(session, kv).generate_ids(ids, mask, GenerationConfig(max_new_tokens=new))

    return Scorer(loss_sum, generate)
