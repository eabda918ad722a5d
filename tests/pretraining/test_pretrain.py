"""The pretraining recipe on a tiny config and a made-up WordNet: output format, resumption, config checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from splitprefix.errors import ConfigError
from splitprefix.pretraining import recipe as pretrain_module
from splitprefix.pretraining.corpus import WordNetMissingError, _wordnet_record, build_corpus
from splitprefix.pretraining.recipe import PretrainConfig, pretrain

WORDS = ("river", "stone", "quick", "light", "garden", "signal", "paper", "winter", "engine", "silver")


def write_fake_wordnet(folder: Path) -> Path:
    """Four `data.*` files in WordNet's layout: a licence header, then synthetic synset records."""
    folder.mkdir(parents=True, exist_ok=True)
    for part_index, part in enumerate(("noun", "verb", "adj", "adv")):
        lines = ["  1 This licence header must be skipped.  ", "  2   "]
        for i in range(60):
            a, b = WORDS[i % 10], WORDS[(3 * i + part_index) % 10]
            gloss = f'a {a} that is {b} in the {WORDS[(i + 5) % 10]}; "the {a} {b} was here"'
            lines.append(f"{i:08d} 03 {part[0]} 02 {a}_{b} 0 {b}(a) 1 000 | {gloss}  ")
        (folder / f"data.{part}").write_text("\n".join(lines) + "\n")
    return folder


def tiny_config(out: Path, wordnet_dir: Path, **overrides: Any) -> PretrainConfig:
    """Two layers of width 16 with grouped-query attention (2 heads, 1 kv head), four steps."""
    settings: dict[str, Any] = dict(
        out=out, steps=4, warmup_steps=1, batch_size=2, block_size=16, vocab_size=300, num_layers=2,
        hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32, max_position_embeddings=32,
        wordnet_dir=wordnet_dir, python_docs=False, stdlib_docstrings=False, heldout_fraction=0.2,
        checkpoint_every=2, log_every=2, num_threads=1,
    )  # fmt: skip
    return PretrainConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_wordnet(tmp_path_factory.mktemp("wordnet"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, wordnet: Path) -> Path:
    """One uninterrupted tiny run, shared by the tests that only read its output."""
    return pretrain(tiny_config(tmp_path_factory.mktemp("run") / "model", wordnet))


def counting(fail_on_call: int | None = None) -> tuple[Callable[..., float], list[int]]:
    """A stand-in for `_train_step` that counts calls and raises KeyboardInterrupt on one of them."""
    calls: list[int] = []
    real = pretrain_module._train_step

    def step(*args: Any) -> float:
        calls.append(1)
        if len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return real(*args)

    return step, calls


def test_output_loads_with_auto_classes(finished: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(finished)
    tokenizer = AutoTokenizer.from_pretrained(finished)

    ids = tokenizer("the river stone", return_tensors="pt").input_ids
    logits = model(input_ids=ids).logits

    assert logits.shape == (1, ids.shape[1], 300)
    assert tokenizer.decode(ids[0]) == "the river stone"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert model.config.num_key_value_heads == 1 and model.config.tie_word_embeddings


def test_output_holds_bf16_weights_recipe_and_eval(finished: Path) -> None:
    weights = load_file(finished / "model.safetensors")
    recipe = json.loads((finished / "recipe.json").read_text())
    scores = json.loads((finished / "eval.json").read_text())

    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert (finished / "generation_config.json").is_file()
    assert not (finished / "checkpoint").exists()
    assert recipe["config"]["steps"] == 4 and recipe["training_tokens"] == 4 * 2 * 16
    assert scores["uniform_baseline_perplexity"] == 300.0
    assert scores["heldout_perplexity"] == pytest.approx(torch.tensor(scores["heldout_loss"]).exp().item())


def test_resumed_run_continues_from_checkpoint_and_matches(
    finished: Path, wordnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path / "model", wordnet)
    interrupt, _ = counting(fail_on_call=3)
    monkeypatch.setattr(pretrain_module, "_train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config)
    assert (tmp_path / "model" / "checkpoint" / "step-0000002").is_dir()
    resume, calls = counting()
    monkeypatch.setattr(pretrain_module, "_train_step", resume)

    pretrain(config)

    assert len(calls) == 2  # steps 3 and 4 only
    resumed, uninterrupted = (
        load_file(tmp_path / "model" / "model.safetensors"),
        load_file(finished / "model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_resume_with_other_settings_is_refused(
    wordnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupt, _ = counting(fail_on_call=3)
    monkeypatch.setattr(pretrain_module, "_train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(tmp_path / "model", wordnet))

    with pytest.raises(ConfigError, match=r"lr: checkpoint 0\.0015 vs now 0\.001"):
        pretrain(tiny_config(tmp_path / "model", wordnet, lr=1e-3))


def test_finished_output_is_not_overwritten(finished: Path, wordnet: Path) -> None:
    with pytest.raises(ConfigError, match="already holds a finished model"):
        pretrain(tiny_config(finished, wordnet))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_kv_heads": 3}, "num_heads=4 must be a multiple of num_kv_heads=3"),
        ({"hidden_size": 250}, "hidden_size=250 must split into num_heads=4"),
        ({"steps": 10, "warmup_steps": 10}, r"warmup_steps must lie in \[0, steps=10\), got 10"),
        ({"block_size": 1024}, "block_size=1024 exceeds max_position_embeddings=512"),
        ({"vocab_size": 100}, "vocab_size must be at least 260, got 100"),
        ({"heldout_fraction": 0.0}, r"heldout_fraction must lie in \(0, 1\), got 0.0"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"num_layers": 64}, "over max_output_mb=25.0"),
    ],
)
def test_invalid_config_raises_config_error(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PretrainConfig(**overrides)


def test_wordnet_record_gives_words_and_gloss() -> None:
    line = '00001740 03 a 02 galore(ip) 0 abstract_entity 0 000 | in great numbers; "apples galore"  \n'

    assert _wordnet_record(line) == 'galore, abstract entity: in great numbers; "apples galore"'
    assert _wordnet_record("  1 This software and database is being provided  \n") is None


def test_missing_wordnet_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(WordNetMissingError, match="apt-get install -y wordnet-base"):
        build_corpus(tmp_path)


def test_split_is_seeded_and_keeps_every_document(wordnet: Path) -> None:
    first, again, other = (
        build_corpus(wordnet, heldout_fraction=0.3, seed=s, python_docs=False) for s in (1, 1, 2)
    )

    assert first == again
    assert first.heldout != other.heldout
    assert len(first.train) + len(first.heldout) == 240


def test_cli_help_lists_the_main_options() -> None:
    from splitprefix.cli.main import app

    result = CliRunner().invoke(app, ["pretrain", "--help"])

    assert result.exit_code == 0
    for option in ("--out", "--steps", "--seed", "--batch-size", "--lr"):
        assert option in result.output
