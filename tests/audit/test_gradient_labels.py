"""The head=client label attack: the model party inverts the gradient sent back into the targets.

It plays the curious server: it owns the norm and head (and, under the U-shaped split, the top M
layers' weights but not their prefix), keeps the states it returned and the gradients it got, and
recovers the target tokens and where the prompt ends."""

from __future__ import annotations

import pytest
import torch

from split_helpers import EXAMPLES
from splitprefix.audit.gradient_labels import best_targets, gradient_label_recovery
from splitprefix.data.batching import encode_examples, resolve_pad_id
from splitprefix.data_party.gradient_noise import GradientNoise
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.split import Bottom


@pytest.fixture(scope="module")
def tiny(dirs):
    model, tok = load_causal_lm(dirs.full), load_tokenizer(dirs.full)
    c = model.config
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(
        c.num_hidden_layers,
        2,
        c.num_key_value_heads,
        3,
        c.hidden_size // c.num_attention_heads,
        generator=gen,
    )
    return model, tok, kv, encode_examples(tok, EXAMPLES, 64)


def test_best_targets_solves_the_cross_entropy_gradient_for_its_target():
    # Prepare: g = a * J^T (p - e_y) for random Jacobians, with a different positive scale per row
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(20, 50, 8, generator=gen)
    probs = torch.randn(20, 50, generator=gen).softmax(-1)
    truth = torch.randint(0, 50, (20,), generator=gen)
    scale = torch.rand(20, 1, generator=gen) + 0.01
    grad = scale * torch.einsum("nvd,nv->nd", jac, probs - torch.nn.functional.one_hot(truth, 50).float())

    # Execute / Assert
    assert torch.equal(best_targets(jac, probs, grad), truth)


def test_head_client_gradients_give_every_target_and_the_prompt_end_away(tiny):
    model, tok, kv, encoded = tiny

    report = gradient_label_recovery(model, Bottom(model, 1), encoded, kv, 1, resolve_pad_id(tok), 0)

    assert report["recovery"] == 1.0 and report["n_targets"] > 20
    assert report["supervision_found"] == 1.0 and report["prompt_end_found"] == 1.0


@pytest.mark.parametrize("client_layers", [1, 2])
def test_u_split_hides_the_prompt_end_and_its_recovery_is_measured(tiny, client_layers):
    model, tok, kv, encoded = tiny

    report = gradient_label_recovery(
        model, Bottom(model, 1), encoded, kv, 1, resolve_pad_id(tok), client_layers
    )

    # gradient now reaches the prompt through the kept layers' attention: zeros no longer mark it
    assert report["prompt_end_found"] == 0.0 and report["supervision_found"] < 0.5
    assert set(report["by_prefix_guess"]) == {"none", "zeros"}
    assert 0.0 <= report["recovery"] <= 1.0 and report["n_targets"] > 20


@pytest.mark.parametrize("client_layers", [0, 2])
def test_gradient_noise_on_what_is_sent_back_lowers_recovery_and_hides_the_prompt_end(tiny, client_layers):
    # Prepare: noise of 32x the gradient's RMS norm (d = 64 here), seeded for a stable rate
    model, tok, kv, encoded = tiny
    noise = GradientNoise(32.0, seed=0)

    # Execute
    report = gradient_label_recovery(
        model, Bottom(model, 1), encoded, kv, 1, resolve_pad_id(tok), client_layers, grad_noise=noise
    )

    # Assert: chance is 1 / 320; every real position gets noise, so zeros mark nothing
    assert report["recovery"] < 0.1 and report["grad_noise"] == 32.0
    assert report["prompt_end_found"] == 0.0
