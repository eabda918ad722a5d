"""The synthetic intent task: determinism, balance, and a test split of unseen compositions and fillers."""

from __future__ import annotations

from collections import Counter

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from splitprefix.data.synthetic import (
    ANSWERS,
    DETAILS,
    FILLERS,
    INTENTS,
    PROMPT_TEMPLATE,
    TEMPLATES,
    SyntheticTaskConfig,
    completion_for,
    make_records,
    make_task,
    split_sources,
)
from splitprefix.errors import ConfigError

SMALL = SyntheticTaskConfig(n_train=400, n_test=200, seed=3)


def test_same_seed_gives_the_same_task() -> None:
    assert make_task(SMALL) == make_task(SyntheticTaskConfig(n_train=400, n_test=200, seed=3))


def test_other_seed_gives_another_task() -> None:
    assert make_task(SMALL) != make_task(SyntheticTaskConfig(n_train=400, n_test=200, seed=4))


def test_records_have_the_prompt_form_and_the_canonical_completion() -> None:
    train, test = make_task(SMALL)

    for example in train + test:
        assert example.label in INTENTS
        assert example.completion == completion_for(example.label) == f" {ANSWERS[example.label]}"
        prefix, suffix = PROMPT_TEMPLATE.split("{message}")
        assert example.prompt.startswith(prefix) and example.prompt.endswith(suffix)
        assert "\n" not in example.prompt[len(prefix) : -len(suffix)]


def test_labels_are_balanced() -> None:
    train, test = make_task(SMALL)

    assert set(Counter(e.label for e in train).values()) == {400 // len(INTENTS)}
    assert set(Counter(e.label for e in test).values()) == {200 // len(INTENTS)}


def test_test_messages_are_compositions_never_seen_in_training() -> None:
    train, test = split_sources(SMALL)
    records = make_records(SMALL)

    assert {r.example.prompt for r in records[0]}.isdisjoint(r.example.prompt for r in records[1])
    for intent in INTENTS:
        seen, held = set(train.pairs[intent]), set(test.pairs[intent])
        assert seen.isdisjoint(held)
        assert len(held) == round(0.25 * len(TEMPLATES[intent]) * (len(DETAILS[intent]) + 1))
        # Each request and each detail of a test pair has a partner in training.
        assert {r for r, _ in held} <= {r for r, _ in seen}
        assert {d for _, d in held} <= {d for _, d in seen}
    assert all((r.template[1], r.detail) in train.pairs[r.template[0]] for r in records[0])
    assert all((r.template[1], r.detail) in test.pairs[r.template[0]] for r in records[1])


def test_held_out_templates_are_never_used_in_training() -> None:
    config = SyntheticTaskConfig(n_train=400, n_test=200, seed=3, test_template_fraction=0.25)
    train, test = split_sources(config)

    for intent in INTENTS:
        seen = {r for r, _ in train.pairs[intent]}
        unseen = {r for r, _ in test.pairs[intent]} - seen
        assert len(seen) == 9 and len(unseen) == 3  # 3 of the 12 requests are held out wholly


def test_test_slot_fillers_are_never_used_in_training() -> None:
    train, test = make_records(SMALL)
    seen = {(slot, value) for r in train for slot, value in r.fillers.items()}
    held_out = {(slot, value) for r in test for slot, value in r.fillers.items()}

    assert held_out
    assert seen.isdisjoint(held_out)
    assert all(value in FILLERS[slot] for slot, value in seen | held_out)


def test_completions_are_a_few_tokens_of_a_bpe_trained_on_the_task() -> None:
    train, _ = make_task(SyntheticTaskConfig(n_train=1000, n_test=0))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([e.prompt + e.completion for e in train], trainer)

    lengths = {intent: len(tokenizer.encode(completion_for(intent)).ids) for intent in INTENTS}

    assert max(lengths.values()) <= 4, lengths


def test_noise_free_messages_are_filled_templates() -> None:
    train, _ = make_records(SyntheticTaskConfig(n_train=50, n_test=0, noise=0.0))

    for record in train:
        intent, index = record.template
        message = record.example.prompt.removeprefix("Customer: ").removesuffix("\nIntent:")
        detail = DETAILS[intent][record.detail] if record.detail >= 0 else ""
        for sentence in (TEMPLATES[intent][index], detail):
            fixed_parts = [part.split("}")[-1] for part in sentence.split("{")]
            assert all(part in message for part in fixed_parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": 0}, "n_train is 0"),
        ({"n_test": -1}, "n_test is -1"),
        ({"test_template_fraction": 1.0}, "test_template_fraction is 1.0"),
        ({"test_pair_fraction": 0.0}, "test_pair_fraction is 0.0"),
        ({"test_filler_fraction": 0.0}, "test_filler_fraction is 0.0"),
        ({"noise": 1.5}, "noise is 1.5"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SyntheticTaskConfig(**kwargs)  # type: ignore[arg-type]
