"""The emulator's default distillation corpus on a machine without WordNet."""

import logging

from splitprefix.model.loading import load_tokenizer
from splitprefix.pretraining import corpus


def test_pretraining_blocks_without_wordnet_fall_back_to_python_docs_and_say_so(monkeypatch, caplog):
    # Prepare: WordNet is missing, as on a fresh machine
    def missing(_directory):
        raise corpus.WordNetMissingError("no WordNet here")

    monkeypatch.setattr(corpus, "wordnet_documents", missing)

    # Execute
    with caplog.at_level(logging.WARNING, logger=corpus.__name__):
        blocks = corpus.pretraining_blocks(load_tokenizer("builtin"), 200_000)

    # Assert: blocks of Python's documentation, and a warning that names the missing package
    assert blocks.ndim == 2 and blocks.shape[0] > 10 and blocks.shape[1] == 128
    assert "wordnet-base" in caplog.text


def test_pretraining_blocks_respect_max_chars_in_the_fallback(monkeypatch):
    monkeypatch.setattr(
        corpus, "wordnet_documents", lambda d: (_ for _ in ()).throw(corpus.WordNetMissingError(d))
    )
    tokenizer = load_tokenizer("builtin")
    small, large = corpus.pretraining_blocks(tokenizer, 50_000), corpus.pretraining_blocks(tokenizer, 400_000)
    assert small.shape[0] < large.shape[0]
