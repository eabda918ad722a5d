"""Tokenization with exact label boundaries, truncation, padding and batch iteration."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from splitprefix.data.batching import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_example,
    iterate_batches,
    prompt_batch,
)
from splitprefix.data.formats import Example
from splitprefix.errors import ConfigError

BOS, EOS, PAD = 1, 2, 0
_CORPUS = [
    "Customer: I want a refund for the blue hoodie\nIntent: refund",
    "Customer: please cancel my subscription\nIntent: cancel_subscription",
    "The quick brown fox jumps over the lazy dog.",
]


# Kept in this module, not a tests/data/conftest.py: a second `conftest` module would shadow the
# top-level one that other test modules import helpers from.
@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (about 300 tokens) trained in memory, with <pad>=0, <s>=1 (BOS), </s>=2 (EOS)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_encode_puts_loss_on_completion_and_eos_only(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    example = Example("Customer: hello\nIntent:", " refund")
    prompt, completion = _ids(tiny_tokenizer, example.prompt), _ids(tiny_tokenizer, example.completion)

    encoded = encode_example(tiny_tokenizer, example, max_length=64)

    assert encoded.input_ids == [BOS, *prompt, *completion, EOS]
    assert encoded.labels == [IGNORE_INDEX] * (1 + len(prompt)) + [*completion, EOS]


def test_text_record_takes_loss_on_every_token_but_bos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    encoded = encode_example(tiny_tokenizer, Example("", "the lazy dog"), max_length=64)

    assert encoded.labels[0] == IGNORE_INDEX
    assert encoded.labels[1:] == encoded.input_ids[1:]


def test_tokenizer_without_bos_gets_none_prepended(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    no_bos = copy.deepcopy(tiny_tokenizer)
    no_bos.bos_token = None

    encoded = encode_example(no_bos, Example("hi", " refund"), max_length=1)

    assert encoded.input_ids == [_ids(tiny_tokenizer, " refund")[0]]
    assert encoded.labels == encoded.input_ids


def test_overlong_record_loses_prompt_from_the_left(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    example = Example("one two three four five six seven eight nine ten", " refund")
    prompt, completion = _ids(tiny_tokenizer, example.prompt), _ids(tiny_tokenizer, example.completion)
    max_length = 1 + 3 + len(completion) + 1
    assert len(prompt) > 3

    encoded = encode_example(tiny_tokenizer, example, max_length)

    assert len(encoded) == max_length
    assert encoded.input_ids == [BOS, *prompt[-3:], *completion, EOS]
    assert encoded.labels[-len(completion) - 1 :] == [*completion, EOS]


def test_completion_longer_than_max_length_keeps_its_head(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    example = Example("some prompt", " the quick brown fox jumps over the lazy dog")
    completion = _ids(tiny_tokenizer, example.completion)
    assert len(completion) > 3

    encoded = encode_example(tiny_tokenizer, example, max_length=4)

    assert encoded.input_ids == [BOS, *completion[:3]]
    assert encoded.labels == [IGNORE_INDEX, *completion[:3]]


def test_max_length_without_room_for_a_token_is_rejected(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ConfigError, match="max_length is 1, expected at least 2"):
        encode_example(tiny_tokenizer, Example("p", "c"), max_length=1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_to_the_longest_with_masked_labels(side: str) -> None:
    rows = [EncodedExample([1, 5, 6, 7], [-100, -100, 6, 7]), EncodedExample([1, 8], [-100, 8])]

    batch = collate(rows, pad_id=PAD, padding_side=side)  # type: ignore[arg-type]

    if side == "right":
        expected_ids = [[1, 5, 6, 7], [1, 8, PAD, PAD]]
        expected_mask = [[1, 1, 1, 1], [1, 1, 0, 0]]
        expected_labels = [[-100, -100, 6, 7], [-100, 8, -100, -100]]
    else:
        expected_ids = [[1, 5, 6, 7], [PAD, PAD, 1, 8]]
        expected_mask = [[1, 1, 1, 1], [0, 0, 1, 1]]
        expected_labels = [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert batch.input_ids.tolist() == expected_ids
    assert batch.attention_mask.tolist() == expected_mask
    assert batch.labels.tolist() == expected_labels
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long


def test_collate_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="no example"):
        collate([], pad_id=PAD)
    with pytest.raises(ConfigError, match="padding_side is 'middle'"):
        collate([EncodedExample([1], [1])], pad_id=PAD, padding_side="middle")  # type: ignore[arg-type]


def test_iterate_batches_is_deterministic_and_covers_everything() -> None:
    items = list(range(10))

    first = list(iterate_batches(items, batch_size=3, shuffle=True, seed=7))
    again = list(iterate_batches(items, batch_size=3, shuffle=True, seed=7))
    other = list(iterate_batches(items, batch_size=3, shuffle=True, seed=8))

    assert first == again
    assert first != other
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == items


def test_iterate_batches_without_shuffle_keeps_order_and_can_drop_last() -> None:
    batches = list(iterate_batches(list(range(5)), batch_size=2, shuffle=False, seed=0, drop_last=True))

    assert batches == [[0, 1], [2, 3]]


def test_iterate_batches_rejects_zero_batch_size() -> None:
    with pytest.raises(ConfigError, match="batch_size is 0"):
        list(iterate_batches([1], batch_size=0, shuffle=False, seed=0))


def test_prompt_batch_left_pads_with_bos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    short, long = "hello", "please cancel my subscription"
    short_ids, long_ids = _ids(tiny_tokenizer, short), _ids(tiny_tokenizer, long)
    pad = len(long_ids) - len(short_ids)

    batch = prompt_batch(tiny_tokenizer, [short, long])

    assert batch.input_ids.tolist() == [[PAD] * pad + [BOS, *short_ids], [BOS, *long_ids]]
    assert batch.attention_mask.tolist() == [
        [0] * pad + [1] * (1 + len(short_ids)),
        [1] * (1 + len(long_ids)),
    ]


def test_prompt_batch_max_length_cuts_from_the_left(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _ids(tiny_tokenizer, "the quick brown fox jumps")

    batch = prompt_batch(tiny_tokenizer, ["the quick brown fox jumps"], max_length=3)

    assert batch.input_ids.tolist() == [[BOS, *ids[-2:]]]
