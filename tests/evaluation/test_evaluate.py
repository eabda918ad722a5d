"""Held-out evaluation: loss, perplexity, token counts and exact match."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TOKENIZER_VOCAB, build_tiny_model, build_tiny_tokenizer
from splitprefix.data.batching import resolve_pad_id
from splitprefix.data.formats import Example
from splitprefix.evaluation.evaluate import (
    EvalConfig,
    Scorer,
    evaluate,
    generate_answers,
    greedy_generate,
    local_scorer,
)
from splitprefix.evaluation.metrics import exact_match, normalize_answer, token_loss_sum
from splitprefix.model.prefix import PrefixConfig
from splitprefix.model.prefixed import forward_with_prefix

EXAMPLES = [
    Example("Customer: I want a refund\nIntent:", " refund"),
    Example("Customer: cancel it please\nIntent:", " cancel subscription"),
    Example("Customer: where is my parcel\nIntent:", " track order"),
]


@pytest.fixture
def model_and_tokenizer():
    return build_tiny_model("llama", vocab_size=TOKENIZER_VOCAB), build_tiny_tokenizer()


def test_loss_counts_completion_and_eos_tokens_only(model_and_tokenizer):
    model, tok = model_and_tokenizer
    report = evaluate(model, tok, EXAMPLES, config=EvalConfig(exact_match=False, batch_size=2))
    expected_tokens = sum(len(tok.encode(e.completion)) + 1 for e in EXAMPLES)  # + EOS
    assert report["n_tokens"] == expected_tokens
    assert math.isclose(report["perplexity"], math.exp(report["loss"]))
    assert "exact_match" not in report


def test_loss_is_batch_size_invariant(model_and_tokenizer):
    model, tok = model_and_tokenizer
    one = evaluate(model, tok, EXAMPLES, config=EvalConfig(exact_match=False, batch_size=1))
    three = evaluate(model, tok, EXAMPLES, config=EvalConfig(exact_match=False, batch_size=3))
    assert one["loss"] == pytest.approx(three["loss"], rel=1e-5)


def test_exact_match_scores_the_models_own_greedy_answers_as_correct(model_and_tokenizer):
    # Prepare: references set to what the model generates alone, batch by batch of one
    model, tok = model_and_tokenizer
    kv = torch.randn(PrefixConfig.for_model(model.config, 3).kv_shape)
    config = EvalConfig(max_new_tokens=4, batch_size=1)
    own = generate_answers(model, tok, [e.prompt for e in EXAMPLES], kv, 4, config)
    references = [Example(e.prompt, answer or " x") for e, answer in zip(EXAMPLES, own, strict=True)]

    # Execute: evaluated in one left-padded batch
    report = evaluate(model, tok, references, kv, EvalConfig(max_new_tokens=4, batch_size=3))

    # Assert
    assert report["exact_match"] == pytest.approx(sum(bool(a.strip()) for a in own) / 3)
    assert report["samples"][0]["predicted"] == normalize_answer(own[0])


def test_exact_match_normalises_whitespace():
    assert exact_match([" refund\n", "cancel  it"], ["refund", "cancel it "]) == 1.0
    assert exact_match(["refund"], ["refunds"]) == 0.0


def test_token_loss_ignores_masked_labels():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[-100, 3, -100, -100]])
    total, n = token_loss_sum(logits, labels)
    assert n == 1
    torch.testing.assert_close(total, torch.nn.functional.cross_entropy(logits[0, :1], labels[0, 1:2]))


def _rerun_scorer(model, tok):
    """The model as a `Scorer` that generates by rerunning the whole sequence per token."""
    pad, eos = resolve_pad_id(tok), tok.eos_token_id

    def logits_fn(ids, mask, prefix):
        return forward_with_prefix(model, ids, mask, prefix)

    def generate(ids, mask, kv, new):
        return greedy_generate(logits_fn, ids, mask, kv, new, pad, eos)

    return Scorer(local_scorer(model, pad).loss_sum, generate)


def test_greedy_generation_by_reruns_matches_hf_generate(model_and_tokenizer):
    # Prepare: the same model, once as a model (HF generate) and once rerun per token
    model, tok = model_and_tokenizer
    kv = torch.randn(PrefixConfig.for_model(model.config, 3).kv_shape)
    prompts = [e.prompt for e in EXAMPLES]
    config = EvalConfig(batch_size=3)

    # Execute
    via_generate = generate_answers(model, tok, prompts, kv, 6, config)
    via_reruns = generate_answers(_rerun_scorer(model, tok), tok, prompts, kv, 6, config)

    # Assert
    assert via_reruns == via_generate


def test_evaluation_through_a_scorer_matches_the_model(model_and_tokenizer):
    model, tok = model_and_tokenizer
    kv = torch.randn(PrefixConfig.for_model(model.config, 2).kv_shape)
    direct = evaluate(model, tok, EXAMPLES, kv, EvalConfig(max_new_tokens=3))
    via_scorer = evaluate(_rerun_scorer(model, tok), tok, EXAMPLES, kv, EvalConfig(max_new_tokens=3))
    assert via_scorer == direct
