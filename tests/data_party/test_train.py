"""The prefix training loop."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TOKENIZER_VOCAB, build_tiny_model, build_tiny_tokenizer
from splitprefix.data.batching import encode_examples, resolve_pad_id
from splitprefix.data.formats import Example
from splitprefix.data_party.train import (
    StepHooks,
    TrainConfig,
    local_loss_fn,
    lr_at,
    make_optimizer,
    train_prefix,
)
from splitprefix.errors import ConfigError
from splitprefix.model.prefix import Prefix, PrefixConfig


@pytest.mark.parametrize("projection_dim", [None, 32])
def test_training_lowers_the_loss_and_leaves_the_model_frozen(projection_dim):
    # Prepare
    model = build_tiny_model("qwen2", vocab_size=TOKENIZER_VOCAB).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = build_tiny_tokenizer()
    data = encode_examples(tok, [Example("Customer: I want a refund\nIntent:", " refund")] * 8, 64)
    prefix = Prefix(PrefixConfig.for_model(model.config, 4, projection_dim=projection_dim))

    # Execute
    history = train_prefix(
        prefix, local_loss_fn(model), data, resolve_pad_id(tok), TrainConfig(steps=20, lr=1e-1)
    )

    # Assert: a random tiny model is hard to steer, so ask for a clear but modest drop
    assert sum(history.losses[-3:]) / 3 < history.losses[0] - 0.3
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())


def test_schedule_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup_steps=10)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(99, config) < 0.15


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError, match="warmup_steps must be >= 0; got -1"):
        TrainConfig(steps=5, warmup_steps=-1)


def test_training_resumes_after_a_crash_with_the_same_result(tmp_path):
    # Prepare
    model = build_tiny_model("gpt2", vocab_size=TOKENIZER_VOCAB)
    tok = build_tiny_tokenizer()
    data = encode_examples(tok, [Example(f"Customer: order {i}\nIntent:", " refund") for i in range(12)], 64)
    config = TrainConfig(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=2)
    loss_fn = local_loss_fn(model)
    torch.manual_seed(0)
    straight = Prefix(PrefixConfig.for_model(model.config, 3))
    torch.manual_seed(0)
    crashed = Prefix(PrefixConfig.for_model(model.config, 3))
    train_prefix(straight, loss_fn, data, resolve_pad_id(tok), config)

    # Execute: the fifth step crashes; the rerun resumes from the checkpoint of step 4
    calls = []

    def crashing(batch, kv):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return loss_fn(batch, kv)

    with pytest.raises(KeyboardInterrupt):
        train_prefix(crashed, crashing, data, resolve_pad_id(tok), config, tmp_path)
    torch.manual_seed(1)  # the resumed run starts from a different initialisation
    resumed = Prefix(PrefixConfig.for_model(model.config, 3))
    history = train_prefix(resumed, loss_fn, data, resolve_pad_id(tok), config, tmp_path)

    # Assert
    assert len(history.losses) == 6
    torch.testing.assert_close(resumed(), straight())


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # Prepare: 2 micro-batches of 2 see the same examples as one batch of 4
    model = build_tiny_model("llama", vocab_size=TOKENIZER_VOCAB)
    tok = build_tiny_tokenizer()
    data = encode_examples(
        tok, [Example(f"Customer: order {i}\nIntent:", " refund" * (i % 3 + 1)) for i in range(8)], 64
    )
    prefixes = []
    for batch_size, accum in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        prefixes.append(Prefix(PrefixConfig.for_model(model.config, 3)))
        config = TrainConfig(steps=3, batch_size=batch_size, grad_accum=accum, warmup_steps=1)
        log = tmp_path / f"metrics-{accum}.jsonl"
        hooks = StepHooks(metrics=lambda: {"bytes_sent": 0}, metrics_log=log)
        train_prefix(prefixes[-1], local_loss_fn(model), data, resolve_pad_id(tok), config, hooks=hooks)

    # Assert
    torch.testing.assert_close(prefixes[0](), prefixes[1](), atol=1e-6, rtol=1e-5)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and {"loss", "step_s", "bytes_sent"} <= set(lines[0])


def test_held_out_evaluation_runs_every_n_steps():
    model = build_tiny_model("llama", vocab_size=TOKENIZER_VOCAB)
    tok = build_tiny_tokenizer()
    data = encode_examples(tok, [Example("Customer: hi\nIntent:", " refund")] * 4, 64)
    config = TrainConfig(steps=5, batch_size=2, warmup_steps=1, eval_every=2)
    hooks = StepHooks(evaluate=lambda prefix: {"loss": 1.0})
    history = train_prefix(
        Prefix(PrefixConfig.for_model(model.config, 2)), local_loss_fn(model), data, 0, config, hooks=hooks
    )
    assert [e["step"] for e in history.evals] == [2, 4, 5]


def _quadratic(batch, kv):
    """A loss of the prefix alone, 0.5 * sum(kv^2) over one 'token': its gradient is kv."""
    return 0.5 * (kv**2).sum(), 1


def _one_example():
    tok = build_tiny_tokenizer()
    return encode_examples(tok, [Example("Customer: hi\nIntent:", " refund")], 16), resolve_pad_id(tok)


def test_sgd_takes_plain_gradient_steps():
    # Prepare: without clipping, one SGD step at lr 0.1 gives kv - 0.1 * kv
    data, pad = _one_example()
    prefix = Prefix(PrefixConfig(1, 1, 2, 2), torch.ones(1, 2, 1, 2, 2))
    config = TrainConfig(steps=1, batch_size=1, lr=0.1, warmup_steps=0, max_grad_norm=0, optimizer="sgd")

    # Execute
    train_prefix(prefix, _quadratic, data, pad, config)

    # Assert
    torch.testing.assert_close(prefix(), torch.full((1, 2, 1, 2, 2), 0.9))


def test_a_run_in_pieces_with_one_optimiser_equals_the_whole_run():
    # Prepare: 3 + 3 steps of one 6-step schedule, the AdamW state carried over, against 6 steps
    data, pad = _one_example()
    start = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    whole = Prefix(PrefixConfig(1, 1, 2, 2), start)
    pieces = Prefix(PrefixConfig(1, 1, 2, 2), start)
    base = {"batch_size": 1, "lr": 0.1, "warmup_steps": 2, "checkpoint_every": 0}
    train_prefix(whole, _quadratic, data, pad, TrainConfig(steps=6, **base))

    # Execute
    optimizer = make_optimizer(pieces, TrainConfig(**base))
    for start_step in (0, 3):
        piece = TrainConfig(steps=3, schedule_steps=6, schedule_start=start_step, **base)
        train_prefix(pieces, _quadratic, data, pad, piece, optimizer=optimizer)

    # Assert
    torch.testing.assert_close(pieces(), whole())


def test_a_piece_must_lie_within_its_schedule():
    with pytest.raises(ConfigError, match=r"steps \[4, 7\) must lie within the schedule's 6 steps"):
        TrainConfig(steps=3, schedule_steps=6, schedule_start=4)
    with pytest.raises(ConfigError, match="optimizer must be 'adamw' or 'sgd'"):
        TrainConfig(optimizer="adam")  # type: ignore[arg-type]
