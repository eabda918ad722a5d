"""The base model shipped inside the package."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitprefix.model.builtin import builtin_dir
from splitprefix.model.loading import describe_model, load_causal_lm


def test_shipped_model_loads_with_plain_transformers_and_is_small():
    directory = builtin_dir()
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert 8 <= model.config.num_hidden_layers <= 12 and 256 <= model.config.hidden_size <= 384
    assert len(tokenizer) == model.config.vocab_size
    assert sum(f.stat().st_size for f in directory.iterdir()) <= 25 * 2**20


def test_shipped_model_is_far_better_than_uniform_and_reports_it():
    report = json.loads((builtin_dir() / "eval.json").read_text())
    assert report["heldout_perplexity"] < report["uniform_baseline_perplexity"] / 20


def test_builtin_name_selects_the_shipped_model():
    assert describe_model("builtin")["num_kv_heads"] == 2
    model = load_causal_lm("builtin")
    ids = torch.tensor([[1, 100, 200]])
    assert model(ids).logits.shape == (1, 3, model.config.vocab_size)
