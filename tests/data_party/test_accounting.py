"""(epsilon, delta) of the noised states: the accountant against the exact Gaussian curve, the release
counts by hand, and a real split training run whose every release is counted on the way out."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from split_helpers import EXAMPLES, write_jsonl
from splitprefix.data.batching import encode_example, prompt_batch
from splitprefix.data_party import split_forward
from splitprefix.data_party.accounting import (
    evaluation_releases,
    gaussian_epsilon,
    generation_releases,
    training_releases,
)
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.split_train import RUN_FILE, SplitTrainConfig, train_split
from splitprefix.data_party.train import TrainConfig
from splitprefix.model.loading import load_tokenizer


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018, Thm 8):
    the root of delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu), by bisection."""

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_at(eps: float) -> float:
        return phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu)

    low, high = 0.0, mu * mu + 20 * mu + 20
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize(("sigma", "tokens"), [(2.0, 1), (2.0, 4), (8.0, 4), (20.0, 16), (1.0, 25)])
def test_epsilon_is_the_gaussian_mechanisms_to_within_the_rdp_slack(sigma, tokens):
    # Prepare: R token states of norm <= C with noise sigma*C: sensitivity 2C sqrt(R), so mu = 2 sqrt(R) / sigma
    mu = 2 * math.sqrt(tokens) / sigma

    # Execute
    epsilon = gaussian_epsilon(sigma, tokens, 1e-5)

    # Assert: RDP is an upper bound on the exact curve, and loose by at most ~15% at these mu
    exact = exact_gaussian_epsilon(mu, 1e-5)
    assert exact <= epsilon <= 1.15 * exact


def test_hand_checked_values():
    # mu = 1 (sigma 2, one token): the exact curve gives 4.38 at delta 1e-5, RDP 4.73
    assert gaussian_epsilon(2.0, 1, 1e-5) == pytest.approx(4.73, abs=0.01)
    assert exact_gaussian_epsilon(1.0, 1e-5) == pytest.approx(4.38, abs=0.01)
    # one release of 4 tokens at sigma 4 is mu = 1 too: only tokens x releases over sigma^2 counts
    assert gaussian_epsilon(4.0, 4) == pytest.approx(gaussian_epsilon(2.0, 1))
    assert gaussian_epsilon(0.0, 3) == math.inf and gaussian_epsilon(1.0, 0) == 0.0


def test_more_releases_cost_more_and_more_noise_less():
    assert gaussian_epsilon(10.0, 100) < gaussian_epsilon(10.0, 400) < gaussian_epsilon(5.0, 400)


def test_release_counts_by_hand():
    # 10 examples in batches of 4 are 3 batches an epoch; 7 batches reach into a third epoch
    assert training_releases([5, 9, 3, 2, 2, 2, 2, 2, 2, 2], batch_size=4, micro_batches=7) == 3 * 9
    # example 0: 2 loss passes of 5 tokens, and 4 new tokens from a 3-token prompt: 3 + 3 more
    assert evaluation_releases([5, 8], [3, 0], loss_passes=2, new_tokens=4) == 2 * 5 + 6
    # with the server's cache: the prompt once, then every new token but the last
    assert generation_releases(prompt_tokens=7, new_tokens=5) == 11


def test_a_training_run_records_epsilon_over_every_release(dirs, server, tmp_path, monkeypatch):
    # Prepare: 6 training and 2 held-out examples; 6 steps of 2 are exactly 2 epochs; evals at 3 and 6
    data = write_jsonl(tmp_path / "train.jsonl", EXAMPLES[:6])
    held_out = write_jsonl(tmp_path / "test.jsonl", EXAMPLES[6:8])
    train = TrainConfig(steps=6, batch_size=2, eval_every=3, checkpoint_every=0)
    privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=50.0)
    config = SplitTrainConfig(prefix_len=2, train=train, eval_data=held_out, privacy=privacy)
    sent = spy_on_the_wire(monkeypatch)

    # Execute
    report = train_split(
        dirs.emulator, ClientSettings(server.url, head="client"), data, tmp_path / "o", config
    )

    # Assert: the counts bound what each example really sent, exactly for training (2 full epochs)
    tokenizer = load_tokenizer(dirs.emulator)
    spent = report["privacy"]
    actual = count_by_example(sent, tokenizer, EXAMPLES[:8])
    assert spent["token_releases"]["train"] == max(actual[i] for i in range(6))
    assert max(actual[6], actual[7]) <= spent["token_releases"]["held_out"]
    loss_only = 3 * max(len(encode_example(tokenizer, e, 128)) for e in EXAMPLES[6:8])
    assert spent["token_releases"]["held_out"] > loss_only  # generation is counted
    worst = spent["token_releases"]["in_both_files"]
    assert worst == spent["token_releases"]["train"] + spent["token_releases"]["held_out"]
    assert spent["epsilon"] == pytest.approx(gaussian_epsilon(50.0, worst)) and spent["delta"] == 1e-5
    saved = json.loads((tmp_path / "o" / RUN_FILE).read_text())
    assert saved["privacy"]["epsilon"] == spent["epsilon"]
    assert saved["config"]["privacy"]["seed"] is None  # the default writes no seed


def spy_on_the_wire(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, token_mask) of every batch whose layer-K states leave through `run_split`."""
    seen, real = [], split_forward.wire_activations

    def spy(bottom, input_ids, token_mask, *args, **kwargs):
        seen.append((input_ids.clone(), token_mask.clone()))
        return real(bottom, input_ids, token_mask, *args, **kwargs)

    monkeypatch.setattr(split_forward, "wire_activations", spy)
    return seen


def count_by_example(sent, tokenizer, examples) -> Counter:
    """Real tokens sent per example; a row belongs to the example whose BOS + prompt it starts with."""
    starts = [prompt_batch(tokenizer, [e.prompt]).input_ids[0].tolist() for e in examples]
    counts: Counter = Counter()
    for ids, mask in sent:
        for row, row_mask in zip(ids, mask, strict=True):
            tokens = row[row_mask.bool()].tolist()
            (owner,) = [i for i, s in enumerate(starts) if tokens[: len(s)] == s]
            counts[owner] += len(tokens)
    return counts
