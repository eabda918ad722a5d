"""Every registry family, tested the same way: a new registry entry is covered once it has a tiny
config in tests/families.py (the first test fails until it does).

Per family variant, on one tiny model with non-default family-specific fields:
- split equals whole, with and without a prefix;
- prefix gradients through the split equal the whole model's, and two split-training steps over
  the server equal two whole-model steps, whether the server holds the graph (per-layer
  checkpointing) or recomputes it;
- greedy split generation over a real loopback server is token-identical to HF `generate` with the
  same prefix as its cache (the sliding windows are shorter than prefix + prompt + new tokens), and
  the server announces the prefix layout (per-layer key/value widths) of the whole model;
- the emulator's bottom, norm and head are bit-identical to the full model's;
- the PEFT adapter round trip, where PEFT's prefix tuning can hold the family's prefix.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from conftest import random_batch
from families import FAMILY_VARIANTS, family_config
from live_server import LiveServer
from split_helpers import (
    PREFIX_LEN,
    SPLIT_AT,
    TIGHT,
    encoded_examples,
    make_dirs,
    seeded_prefix,
    server_settings,
)
from splitprefix.data.batching import resolve_pad_id
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import TrainConfig, local_loss_fn, train_prefix
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.peft_io import export_peft, import_peft, peft_unsupported
from splitprefix.model.prefix import PrefixConfig
from splitprefix.model.prefixed import forward_split, forward_with_prefix, generate_with_prefix
from splitprefix.model.registry import ARCHITECTURES
from splitprefix.model.split import Bottom, Head, split_model, token_positions
from splitprefix.model_party.app import create_app

# fp32, the same ops in the same order as HF: observed differences are 0; the tolerance allows for
# kernels that reorder a sum.
EXACT = dict(atol=1e-6, rtol=1e-5)
# Gradients are about 1e-3 here; observed differences are 0, as for the logits.
GRAD = dict(atol=1e-7, rtol=1e-5)
PROMPT_LEN, NEW_TOKENS = 12, 8
TWO_STEPS = TrainConfig(steps=2, batch_size=4, warmup_steps=1, lr=5e-2, checkpoint_every=0)


def test_every_registry_family_has_a_tiny_variant():
    covered = {family for family, _ in FAMILY_VARIANTS.values()}
    assert covered == set(ARCHITECTURES), f"no tiny config for {set(ARCHITECTURES) - covered}"
    for variant, (family, _) in FAMILY_VARIANTS.items():
        assert family_config(variant).model_type == family, variant


@pytest.fixture(scope="module", params=sorted(FAMILY_VARIANTS))
def family(request, tmp_path_factory):
    """(variant, dirs of the saved model and its emulator, the whole model) for one family variant."""
    variant = request.param
    dirs = make_dirs(tmp_path_factory.mktemp(variant), variant)
    return variant, dirs, load_causal_lm(dirs.full)


@pytest.fixture(scope="module")
def server(family):
    _, dirs, _ = family
    with LiveServer(create_app(server_settings(dirs))) as live:
        yield live


def _batch():
    return random_batch(batch=3, length=PROMPT_LEN, padding="left")


@pytest.mark.parametrize("with_prefix", [False, True])
def test_split_equals_whole(family, with_prefix):
    # Prepare
    _, _, whole = family
    ids, mask = _batch()
    kv = seeded_prefix(whole.config)().detach() if with_prefix else None

    # Execute
    with torch.no_grad():
        if kv is None:
            expected = whole(input_ids=ids, attention_mask=mask, position_ids=token_positions(mask)).logits
        else:
            expected = forward_with_prefix(whole, ids, mask, kv)
        actual = forward_split(split_model(whole, SPLIT_AT, head="client"), ids, mask, kv)

    # Assert: padded slots hold garbage in both, so compare the real tokens only
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], **EXACT)


def test_prefix_gradients_through_the_split_equal_the_whole_model(family):
    # Prepare
    _, _, whole = family
    ids, mask = _batch()
    prefix = seeded_prefix(whole.config)
    real = mask.bool()

    def gradient(logits_of) -> torch.Tensor:
        kv = prefix().detach().requires_grad_(True)
        logits_of(kv)[real].logsumexp(-1).mean().backward()
        return kv.grad

    # Execute
    expected = gradient(lambda kv: forward_with_prefix(whole, ids, mask, kv))
    actual = gradient(lambda kv: forward_split(split_model(whole, SPLIT_AT), ids, mask, kv))

    # Assert: equal, and non-zero in every layer on both sides of the cut
    torch.testing.assert_close(actual, expected, **GRAD)
    assert (expected.flatten(1).abs().amax(1) > 0).all()


@pytest.mark.parametrize("head", ["server", "client"])
def test_greedy_split_generation_over_the_server_equals_hf_generate(family, server, head):
    # Prepare
    _, dirs, whole = family
    ids, mask = _batch()
    kv = seeded_prefix(whole.config)().detach()
    expected = generate_with_prefix(whole, ids, mask, kv, NEW_TOKENS, pad_token_id=0)

    # Execute
    with SplitModel.open(dirs.emulator, ClientSettings(server.url, head=head)) as model:
        model.kv = kv
        generated = model.generate_ids(ids, mask, GenerationConfig(max_new_tokens=NEW_TOKENS))

    # Assert
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("keep_graph", [True, False], ids=["graph-held", "recompute"])
@pytest.mark.parametrize("head", ["server", "client"])
def test_split_training_over_the_server_equals_whole_model_training(family, server, head, keep_graph):
    # Prepare: two optimiser steps on the same examples and the same initial prefix
    _, dirs, whole = family
    tokenizer = load_tokenizer(dirs.full)
    examples, pad = encoded_examples(tokenizer), resolve_pad_id(tokenizer)
    expected = seeded_prefix(whole.config)
    expected_losses = train_prefix(expected, local_loss_fn(whole), examples, pad, TWO_STEPS).losses

    # Execute
    session = open_split(dirs.emulator, ClientSettings(server.url, head=head, keep_graph=keep_graph))
    try:
        prefix = seeded_prefix(whole.config)
        losses = train_prefix(prefix, session.loss_fn(), examples, pad, TWO_STEPS).losses
    finally:
        session.close()

    # Assert
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), **TIGHT)
    torch.testing.assert_close(prefix().detach(), expected().detach(), **TIGHT)


def test_the_server_announces_the_prefix_layout_of_the_whole_model(family, server):
    _, dirs, whole = family
    with SplitModel.open(dirs.emulator, ClientSettings(server.url)) as model:
        announced = model.split.prefix_config(PREFIX_LEN)
    assert announced == PrefixConfig.for_model(whole.config, PREFIX_LEN)


def test_the_emulator_keeps_bottom_norm_and_head_bit_identical(family):
    # Prepare
    _, dirs, whole = family

    # Execute
    emulator = load_causal_lm(dirs.emulator)

    # Assert
    for part in (lambda m: Bottom(m, SPLIT_AT), Head):
        ours, theirs = part(whole).state_dict(), part(emulator).state_dict()
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert torch.equal(theirs[name], tensor), name


def test_the_peft_adapter_round_trip_reproduces_the_split(family, tmp_path):
    # Prepare: a fresh copy for PEFT to wrap, since wrapping patches the model's generation hooks
    _, dirs, whole = family
    prefix = seeded_prefix(whole.config)
    reason = peft_unsupported(prefix.config)
    if reason is not None:
        pytest.skip(reason)
    ids, mask = _batch()
    with torch.no_grad():
        expected = forward_split(split_model(whole, SPLIT_AT), ids, mask, prefix())

    # Execute
    export_peft(prefix, tmp_path)
    peft_model = PeftModel.from_pretrained(load_causal_lm(dirs.full), tmp_path)
    with torch.no_grad():
        actual = peft_model(input_ids=ids, attention_mask=mask).logits

    # Assert: PEFT's positions count padding, so compare only the rows it shares with us: unpadded ones
    torch.testing.assert_close(actual[0], expected[0], **EXACT)
    torch.testing.assert_close(import_peft(tmp_path)(), prefix().detach(), atol=0, rtol=0)
