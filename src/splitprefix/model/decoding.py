"""The one token-by-token decoding loop: every generator in the project (the split model over the
network, the audit's cache-less stand-in) supplies only how to get the next scores and how to pick.

Keeping the loop in one place keeps its rules in one place: a row that has produced EOS is padded
with the pad id from then on, the loop ends once every row has, and the last step asks the model
for nothing (no wasted forward after the final token).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

import torch

S = TypeVar("S")
"""Whatever the model answers per step (logits (B, V), or the k best with their ids)."""


def decode(
    first: S,
    advance: Callable[[torch.Tensor], S],
    choose: Callable[[S], torch.Tensor],
    max_new_tokens: int,
    pad_token_id: int,
    eos_ids: torch.Tensor | None,
) -> Generator[torch.Tensor, None, None]:
    """Each step's next tokens (B,), at most `max_new_tokens` of them.

    `first` is the model's answer for the prompts; `choose` turns an answer into tokens (B,);
    `advance(tokens)` feeds them to the model and returns its next answer. `eos_ids` (E,) lies on
    the tokens' device; None never stops early.
    """
    answer, finished = first, None
    for step in range(max_new_tokens):
        token = choose(answer)  # (B,)
        if finished is None:
            finished = torch.zeros_like(token, dtype=torch.bool)
        token = token.masked_fill(finished, pad_token_id)
        yield token
        if eos_ids is not None:
            finished |= torch.isin(token, eos_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        answer = advance(token)
