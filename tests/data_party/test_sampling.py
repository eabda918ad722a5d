"""Choosing the next token: greedy, temperature, top-k and top-p, from full logits or the k best."""

from __future__ import annotations

import pytest
import torch

from splitprefix.data_party.sampling import GenerationConfig, _nucleus, next_tokens
from splitprefix.errors import ConfigError


def test_greedy_picks_the_argmax_from_full_logits_or_from_the_k_best():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 0.0, 1.0]])
    best, ids = torch.topk(logits, 2)
    greedy = GenerationConfig()
    assert next_tokens(logits, None, greedy, None).tolist() == [1, 0]
    assert next_tokens(best, ids, greedy, None).tolist() == [1, 0]


def test_nucleus_keeps_the_smallest_set_that_reaches_top_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p = 0.75 needs the first two, 0.81 the first three
    scores = torch.tensor([[0.5, 0.05, 0.3, 0.15]]).log()
    kept = torch.isfinite(_nucleus(scores, 0.75))
    assert kept.tolist() == [[True, False, True, False]]
    assert torch.isfinite(_nucleus(scores, 0.81)).tolist() == [[True, False, True, True]]


def test_top_k_sampling_never_leaves_the_k_best_and_is_seeded():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(do_sample=True, top_k=3, seed=5)
    allowed = torch.topk(logits, 3).indices
    draws = [next_tokens(logits, None, config, config.generator()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    for _ in range(20):
        token = next_tokens(logits, None, config, None)
        assert (allowed == token[:, None]).any(dim=1).all()


def test_the_server_sends_one_logit_for_greedy_k_for_top_k_and_all_for_top_p():
    assert GenerationConfig().server_top_k == 1
    assert GenerationConfig(do_sample=True, top_k=7).server_top_k == 7
    assert GenerationConfig(do_sample=True, top_k=7, top_p=0.9).server_top_k == 0
    assert GenerationConfig(do_sample=True).server_top_k == 0


@pytest.mark.parametrize(
    "fields",
    [dict(max_new_tokens=0), dict(do_sample=True, temperature=0.0), dict(top_p=0.0), dict(stop=("",))],
)
def test_bad_settings_are_refused(fields):
    with pytest.raises(ConfigError):
        GenerationConfig(**fields)
