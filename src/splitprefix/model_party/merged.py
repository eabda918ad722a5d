"""Generation forwards on the server's layers: a session's prefill, and merged steps of many sessions.

`run_steps` runs the steps of several sessions (of any parties, each with its own prefix length,
prompt length and cache) as one forward: their caches are left-padded to the longest under the
attention mask (`session_cache.padded_cache`; a session alone runs on its own buffers, with no
copy), their rows stacked, and the answers split back per session. A row sees the same keys at
the same positions as it would alone, so a party's greedy tokens are the same whether its steps
are merged or not (tests/model_party/test_merged.py); the float sums may differ in the last bits,
as they do between batch sizes of one model.

Both run under inference mode (no autograd bookkeeping): a session's tensors never meet a backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from splitprefix.model.prefix import prefix_cache
from splitprefix.model.split import Activations
from splitprefix.model_party.backend import Tensors, TopBackend
from splitprefix.model_party.session_cache import padded_cache
from splitprefix.model_party.sessions import Session
from splitprefix.wire import schemas


@dataclass
class StepWork:
    """One session's step, checked against the session and ready to run."""

    session: Session
    hidden: torch.Tensor
    """(B, T, d) layer-K hidden states of the new tokens."""
    mask: torch.Tensor
    """(B, T) token mask of the new tokens."""
    positions: torch.Tensor
    """(B, T) their positions."""
    step_id: str = ""
    """The request's step id, remembered with the answer for a retried request."""

    @property
    def group(self) -> tuple[int, int]:
        """Steps merge when they run the same layers for the same number of new tokens."""
        return self.session.client_layers, int(self.mask.shape[1])

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def keys(self) -> int:
        """Keys each row attends to in this step."""
        return self.session.length + int(self.mask.shape[1])


@torch.inference_mode()
def prefill(backend: TopBackend, session: Session, kv: torch.Tensor, work: StepWork) -> Tensors:
    """Seed the session's cache with the prefix `kv` (n, 2, n_kv, P, hd) and run the prompts."""
    b, batch = backend, session.batch_size
    prefix_len = int(kv.shape[3])
    cache = (
        prefix_cache(kv, b.config, batch, b.settings.split_at)
        if prefix_len
        else DynamicCache(config=b.config)
    )
    full_mask = torch.cat([work.mask.new_ones(batch, prefix_len), work.mask], dim=1)  # (B, P + T)
    out = _forward(b, [work], cache, full_mask)
    session.cache.take(cache, slice(0, batch), full_mask.to(session.cache.key_mask.device))
    session.mask = session.cache.mask
    session.next_positions = work.positions[:, -1:] + 1  # (B, 1)
    return _answers(b, [work], out)[0]


@torch.inference_mode()
def run_steps(backend: TopBackend, works: list[StepWork]) -> list[Tensors]:
    """One forward for the steps of several sessions (one `group`, each session once); their answers."""
    length, new = max(w.session.length for w in works), int(works[0].mask.shape[1])  # one group: one T
    cache = padded_cache(backend.config, [w.session.cache for w in works], length, new)
    cached = torch.cat([w.session.cache.padded_mask(length) for w in works])  # (R, S)
    full_mask = torch.cat([cached, torch.cat([w.mask.to(cached.device) for w in works])], dim=1)
    out = _forward(backend, works, cache, full_mask)  # (R, T, d)
    start = 0
    for w in works:
        rows = slice(start, start + w.rows)
        w.session.cache.take(cache, rows, w.mask.to(cached.device))
        w.session.mask = w.session.cache.mask
        w.session.next_positions = w.positions[:, -1:] + 1  # (B, 1)
        start += w.rows
    return _answers(backend, works, out)


def _forward(
    b: TopBackend, works: list[StepWork], cache: DynamicCache, full_mask: torch.Tensor
) -> torch.Tensor:
    device = b.settings.device
    hidden = torch.cat([w.hidden for w in works]).to(device, b.dtype)  # (R, T, d)
    positions = torch.cat([w.positions for w in works]).to(device)  # (R, T)
    x = Activations(hidden, full_mask.to(device), positions)
    return b.stacks[works[0].session.client_layers](x, cache)  # (R, T, d)


def _answers(b: TopBackend, works: list[StepWork], out: torch.Tensor) -> list[Tensors]:
    """Each session's answer from the merged output (R, T, d); the head runs once for all its rows."""
    offsets, start = [], 0
    for w in works:
        offsets.append(slice(start, start + w.rows))
        start += w.rows
    served = [i for i, w in enumerate(works) if w.session.head == "server" and not w.session.client_layers]
    logits = None
    if len(served) == len(works):
        logits = b.top.head(out[:, -1])  # (R, V)
    elif served:
        rows = torch.cat([torch.arange(offsets[i].start, offsets[i].stop) for i in served])
        logits = b.top.head(out[rows, -1])  # (R', V): the head=server rows only
    answers, at = [], 0
    for i, w in enumerate(works):
        mine = out[offsets[i]]
        if w.session.client_layers:
            answers.append({schemas.OUTPUT: mine.clone()})
        elif w.session.head == "client":
            answers.append({schemas.LAST_HIDDEN: mine[:, -1].clone()})
        else:
            assert logits is not None
            answers.append(_head_answer(logits[at : at + w.rows], w.session.top_k))
            at += w.rows
    return answers


def _head_answer(logits: torch.Tensor, top_k: int) -> Tensors:
    """Full logits (B, V), or the k best values and indices (B, k)."""
    if top_k == 0:
        return {schemas.LOGITS: logits.clone()}
    values, indices = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)  # (B, k)
    return {schemas.TOP_VALUES: values, schemas.TOP_INDICES: indices}
