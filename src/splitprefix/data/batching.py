"""From examples to padded tensors: tokenization with exact label boundaries, collation, batching.

Label convention (the Hugging Face one): ``labels`` is aligned with ``input_ids``, so ``labels[t]`` is
either ``input_ids[t]`` or `IGNORE_INDEX`. The causal shift happens in the loss, which compares the
logits at position t with ``labels[t + 1]``; nothing here shifts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import torch

from splitprefix.data.formats import Example
from splitprefix.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of a position that takes no loss (prompt, BOS, padding); PyTorch's cross-entropy default."""

PaddingSide = Literal["left", "right"]
T = TypeVar("T")


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized example, unpadded."""

    input_ids: list[int]
    """Token ids: optional BOS, prompt, completion, optional EOS."""
    labels: list[int]
    """Same length as ``input_ids``; the completion's ids (and EOS), `IGNORE_INDEX` elsewhere."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Batch:
    """A padded training batch; every tensor is int64 of shape (B, T)."""

    input_ids: torch.Tensor
    """Token ids, padding filled with the pad id."""
    attention_mask: torch.Tensor
    """1 on real tokens, 0 on padding."""
    labels: torch.Tensor
    """Aligned with ``input_ids`` (no shift), `IGNORE_INDEX` on prompt and padding."""

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass(frozen=True)
class PromptBatch:
    """Prompts ready for generation; both tensors are int64 of shape (B, T)."""

    input_ids: torch.Tensor
    """BOS plus prompt ids, padded (on the left by default) with the pad id."""
    attention_mask: torch.Tensor
    """1 on real tokens, 0 on padding."""


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> EncodedExample:
    """Tokenize ``[BOS] prompt completion [EOS]`` with the loss on the completion and EOS only.

    Prompt and completion are tokenized separately and concatenated, so the label boundary is exact
    even where a merged tokenization would fuse tokens across it. BOS and EOS are added only when the
    tokenizer defines them.

    A record longer than ``max_length`` tokens loses its prompt from the left first, because the
    completion carries the loss; if the completion alone still does not fit, its tail (EOS first) is
    cut. BOS is always kept. Since ``max_length`` must leave room for BOS plus one token, and a
    non-empty completion has at least one token, every encoded example keeps a supervised token.
    """
    bos = _optional_id(tokenizer.bos_token_id)
    eos = _optional_id(tokenizer.eos_token_id)
    if max_length < len(bos) + 1:
        raise ConfigError(
            f"max_length is {max_length}, expected at least {len(bos) + 1} (BOS plus one token)"
        )
    prompt = _encode(tokenizer, example.prompt)
    completion = _encode(tokenizer, example.completion) + eos
    budget = max_length - len(bos)
    completion = completion[:budget]
    prompt_room = budget - len(completion)
    prompt = prompt[max(0, len(prompt) - prompt_room) :]
    input_ids = bos + prompt + completion
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion
    assert len(input_ids) <= max_length and any(label != IGNORE_INDEX for label in labels)
    return EncodedExample(input_ids=input_ids, labels=labels)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[EncodedExample]:
    """`encode_example` over a list."""
    return [encode_example(tokenizer, example, max_length) for example in examples]


def collate(encoded: Sequence[EncodedExample], pad_id: int, padding_side: PaddingSide = "right") -> Batch:
    """Pad examples to the longest one; labels are `IGNORE_INDEX` on padding.

    Right padding suits training. With left padding, position ids must come from the attention mask
    (``mask.cumsum(-1) - 1``), as Hugging Face ``generate`` does, or rows get shifted positions.
    """
    if not encoded:
        raise ConfigError("collate got no example, expected at least one")
    _check_side(padding_side)
    length = max(len(example) for example in encoded)
    ids = [_pad(e.input_ids, pad_id, length, padding_side) for e in encoded]
    labels = [_pad(e.labels, IGNORE_INDEX, length, padding_side) for e in encoded]
    mask = [_pad([1] * len(e), 0, length, padding_side) for e in encoded]
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.long),  # (B, T)
        attention_mask=torch.tensor(mask, dtype=torch.long),  # (B, T)
        labels=torch.tensor(labels, dtype=torch.long),  # (B, T)
    )


def iterate_batches(
    items: Sequence[T], batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> Iterator[list[T]]:
    """Yield lists of ``batch_size`` items (the last may be shorter unless ``drop_last``).

    The order depends only on ``seed``; pass ``seed + epoch`` for a new order every epoch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size}, expected a positive integer")
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield [items[i] for i in chunk]


def prompt_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    padding_side: PaddingSide = "left",
    max_length: int | None = None,
) -> PromptBatch:
    """Tokenize prompts for generation: BOS (when defined) plus the prompt, padded to the longest.

    Left padding (the default) puts every prompt's last token in the last column, where generation
    continues. ``max_length`` cuts prompts from the left, keeping BOS.
    """
    if not prompts:
        raise ConfigError("prompt_batch got no prompt, expected at least one")
    _check_side(padding_side)
    bos = _optional_id(tokenizer.bos_token_id)
    if max_length is not None and max_length < len(bos) + 1:
        raise ConfigError(
            f"max_length is {max_length}, expected at least {len(bos) + 1} (BOS plus one token)"
        )
    rows = []
    for prompt in prompts:
        ids = _encode(tokenizer, prompt)
        if max_length is not None:
            ids = ids[max(0, len(ids) - (max_length - len(bos))) :]
        rows.append(bos + ids)
    length = max(len(row) for row in rows)
    pad_id = resolve_pad_id(tokenizer)
    return PromptBatch(
        input_ids=torch.tensor([_pad(r, pad_id, length, padding_side) for r in rows]),  # (B, T)
        attention_mask=torch.tensor([_pad([1] * len(r), 0, length, padding_side) for r in rows]),  # (B, T)
    )


def resolve_pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any id works)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    raise ConfigError("the tokenizer has neither a pad token nor an EOS token, expected at least one")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def _optional_id(token_id: object) -> list[int]:
    return [token_id] if isinstance(token_id, int) else []


def _pad(row: list[int], value: int, length: int, side: PaddingSide) -> list[int]:
    padding = [value] * (length - len(row))
    return padding + row if side == "left" else row + padding


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ConfigError(f"padding_side is {side!r}, expected 'left' or 'right'")
