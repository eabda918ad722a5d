"""Bottom ∘ top (∘ head) must equal the whole Hugging Face model, for every architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from conftest import build_tiny_model, random_batch, tiny_config
from splitprefix.errors import ConfigError, ShapeMismatchError, UnsupportedArchitectureError
from splitprefix.model.prefix import PrefixConfig, prefix_cache
from splitprefix.model.prefixed import forward_split, forward_with_prefix, generate_with_prefix
from splitprefix.model.split import Activations, split_model, token_positions

# Layer-by-layer execution performs the same ops in the same order as HF's forward.
EXACT = dict(atol=1e-6, rtol=1e-5)


def _hf_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=token_positions(mask)).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("head", ["server", "client"])
def test_split_equals_whole_model(arch, attn, padding, head):
    # Prepare
    model = build_tiny_model(arch, attn)
    ids, mask = random_batch(padding=padding)
    parts = split_model(model, split_at=2, head=head)

    # Execute
    with torch.no_grad():
        expected = _hf_logits(model, ids, mask)
        actual = forward_split(parts, ids, mask, kv=None)

    # Assert: padded slots hold garbage in both, so compare the real tokens only
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], **EXACT)


@pytest.mark.parametrize("split_at", [1, 3])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_split_with_prefix_equals_whole_with_prefix_cache(arch, split_at, padding):
    # Prepare
    model = build_tiny_model(arch)
    ids, mask = random_batch(padding=padding)
    kv = torch.randn(PrefixConfig.for_model(model.config, 5).kv_shape)
    parts = split_model(model, split_at=split_at, head="client")

    # Execute
    with torch.no_grad():
        expected = forward_with_prefix(model, ids, mask, kv)
        actual = forward_split(parts, ids, mask, kv)

    # Assert
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], **EXACT)


def test_prefix_changes_the_output(arch):
    # Prepare: guards the tests above against a prefix that is silently ignored
    model = build_tiny_model(arch)
    ids, mask = random_batch()
    kv = torch.randn(PrefixConfig.for_model(model.config, 5).kv_shape)

    # Execute
    with torch.no_grad():
        with_prefix = forward_split(split_model(model, 2), ids, mask, kv)
        without = forward_split(split_model(model, 2), ids, mask, None)

    # Assert
    assert (with_prefix - without).abs().max() > 1e-2


@pytest.mark.parametrize("padding", [None, "left"])
def test_prefix_gradients_through_split_equal_whole(arch, padding):
    # Prepare
    model = build_tiny_model(arch)
    ids, mask = random_batch(padding=padding)
    kv_shape = PrefixConfig.for_model(model.config, 4).kv_shape
    kv_whole = torch.randn(kv_shape, requires_grad=True)
    kv_split = kv_whole.detach().clone().requires_grad_(True)
    weights = torch.randn(model.config.vocab_size)

    def loss(logits):
        return (logits[mask.bool()] * weights).sum()

    # Execute
    loss(forward_with_prefix(model, ids, mask, kv_whole)).backward()
    loss(forward_split(split_model(model, 2, head="client"), ids, mask, kv_split)).backward()

    # Assert
    assert kv_whole.grad is not None and kv_whole.grad.abs().sum() > 0
    torch.testing.assert_close(kv_split.grad, kv_whole.grad, atol=1e-5, rtol=1e-4)


def test_no_prefix_reproduces_base_model(arch):
    # Prepare
    model = build_tiny_model(arch)
    ids, mask = random_batch(padding="right")

    # Execute
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        disabled = forward_with_prefix(model, ids, mask, kv=None)

    # Assert
    real = mask.bool()
    torch.testing.assert_close(disabled[real], base[real], **EXACT)


def test_parts_share_the_model_weights():
    model = build_tiny_model("llama")
    parts = split_model(model, 2, head="client")
    assert parts.bottom.embeddings.tokens.weight is model.get_input_embeddings().weight
    assert parts.top.stack.layers[0] is model.model.layers[2]
    assert parts.head is not None and parts.head.lm_head is model.lm_head


@pytest.mark.parametrize("split_at", [0, 4, -1, 7])
def test_split_at_out_of_range_is_rejected(split_at):
    model = build_tiny_model("llama")
    with pytest.raises(ConfigError, match=r"1 <= K < L=4"):
        split_model(model, split_at)


def test_unsupported_architecture_lists_supported_ones():
    config = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"'opt'.*deepseek_v3, falcon, gemma2, gemma3_text, gpt2, gpt_neox, granite, llama",
    ):
        split_model(model, 1)


def test_an_option_the_registry_entry_does_not_implement_is_rejected():
    config = tiny_config("gemma3_text")
    config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedArchitectureError, match="use_bidirectional_attention"):
        split_model(AutoModelForCausalLM.from_config(config), 1)


def test_mask_that_omits_the_prefix_is_rejected():
    # Prepare: a (B, T) mask with a P-token prefix in the cache is the silent-wrong-numbers pitfall
    model = build_tiny_model("llama")
    ids, mask = random_batch()
    kv = torch.randn(PrefixConfig.for_model(model.config, 5).kv_shape)
    parts = split_model(model, 2)
    cache = prefix_cache(kv[:2], model.config, ids.shape[0])

    # Execute / Assert
    with pytest.raises(ShapeMismatchError, match=r"\(3, 12\).*got \(3, 7\)"):
        parts.bottom(ids, mask, token_positions(mask, 5), cache)


def test_mismatched_hidden_and_positions_are_rejected():
    model = build_tiny_model("qwen2")
    parts = split_model(model, 2)
    x = Activations(torch.zeros(2, 5, 64), torch.ones(2, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match="positions"):
        parts.top(x)


def test_tiny_config_uses_grouped_query_attention():
    assert tiny_config("llama").num_key_value_heads < tiny_config("llama").num_attention_heads


def test_generate_with_prefix_equals_a_manual_greedy_loop(arch):
    # Prepare
    model = build_tiny_model(arch)
    ids, mask = random_batch(padding="left")
    kv = torch.randn(PrefixConfig.for_model(model.config, 5).kv_shape)
    model.generation_config.eos_token_id = None  # run every step so all tokens are compared

    # Execute
    generated = generate_with_prefix(model, ids, mask, kv, max_new_tokens=5, pad_token_id=0)
    steps = []
    with torch.no_grad():
        for _ in range(5):
            next_ids = forward_with_prefix(model, ids, mask, kv)[:, -1].argmax(-1, keepdim=True)
            steps.append(next_ids)
            ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones_like(next_ids)], 1)

    # Assert
    assert torch.equal(generated, torch.cat(steps, 1))
