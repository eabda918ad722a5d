"""The deep prefix: shapes, reparameterisation, slicing and files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import build_tiny_model, tiny_config
from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.model.prefix import (
    CONFIG_FILE,
    Prefix,
    PrefixConfig,
    kv_to_rows,
    prefix_cache,
    rows_to_kv,
    split_kv,
)
from splitprefix.model.prefixed import forward_with_prefix


def test_kv_shape_uses_key_value_heads(arch):
    config = tiny_config(arch)
    prefix = Prefix(PrefixConfig.for_model(config, 6))
    kv_heads = 2 if arch != "gpt2" else 4  # the rotary tiny configs use grouped-query attention
    assert prefix().shape == (4, 2, kv_heads, 6, 16)


def test_split_kv_gives_bottom_and_top_layers():
    kv = torch.randn(4, 2, 2, 3, 16)
    bottom, top = split_kv(kv, 1)
    assert bottom.shape[0] == 1 and top.shape[0] == 3
    torch.testing.assert_close(torch.cat([bottom, top]), kv)


def test_rows_and_kv_are_inverse_with_peft_row_layout():
    config = PrefixConfig(num_layers=3, num_kv_heads=2, head_dim=4, num_virtual_tokens=5)
    kv = torch.randn(config.kv_shape)
    rows = kv_to_rows(kv)
    # PEFT layout: row p = [L0_K | L0_V | L1_K | ...], each block (n_kv, head_dim) flattened
    torch.testing.assert_close(rows[2, 8:16], kv[0, 1, :, 2, :].reshape(-1))
    torch.testing.assert_close(rows_to_kv(rows, config), kv)


def test_fold_keeps_the_reparameterised_values():
    prefix = Prefix(
        PrefixConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_virtual_tokens=3, projection_dim=8)
    )
    folded = prefix.fold()
    assert folded.config.projection_dim is None
    assert [name for name, _ in folded.named_parameters()] == ["kv"]
    torch.testing.assert_close(folded(), prefix().detach())


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_save_and_load_round_trip(tmp_path, projection_dim):
    prefix = Prefix(PrefixConfig(2, 2, 4, 3, projection_dim=projection_dim))
    prefix.save(tmp_path)
    loaded = Prefix.load(tmp_path)
    assert loaded.config == prefix.config
    torch.testing.assert_close(loaded(), prefix(), atol=0, rtol=0)


def test_load_ignores_unknown_config_keys_with_a_warning(tmp_path):
    Prefix(PrefixConfig(2, 2, 4, 3)).save(tmp_path)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**raw, "from_the_future": 1}))
    with pytest.warns(UserWarning, match="from_the_future"):
        Prefix.load(tmp_path)


def test_load_rejects_weights_that_do_not_match_the_config(tmp_path):
    Prefix(PrefixConfig(2, 2, 4, 3)).save(tmp_path)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**raw, "num_virtual_tokens": 7}))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 2, 2, 3, 4\)"):
        Prefix.load(tmp_path)


@pytest.mark.parametrize(("field", "value"), [("num_layers", 5), ("num_kv_heads", 4), ("head_dim", 8)])
def test_prefix_for_another_shape_is_rejected(field, value):
    config = tiny_config("llama")
    other = dataclasses.replace(PrefixConfig.for_model(config, 3), **{field: value})
    with pytest.raises(ShapeMismatchError, match=r"expected \(layers, kv_heads, head_dim\) = \(4, 2, 16\)"):
        other.check_fits(config)


def test_prefix_cache_rejects_kv_of_the_wrong_shape():
    config = tiny_config("llama")
    with pytest.raises(ShapeMismatchError, match=r"\(4, 2, 2, 3, 16\); got \(4, 2, 4, 3, 16\)"):
        prefix_cache(torch.zeros(4, 2, 4, 3, 16), config, batch_size=1)
    with pytest.raises(ShapeMismatchError, match="exceeds L=4"):
        prefix_cache(torch.zeros(3, 2, 2, 3, 16), config, batch_size=1, first_layer=2)


def test_initial_kv_of_the_wrong_shape_is_rejected():
    with pytest.raises(ShapeMismatchError, match="got"):
        Prefix(PrefixConfig(2, 2, 4, 3), kv=torch.zeros(2, 2, 4, 3, 4))


def test_invalid_config_is_rejected():
    with pytest.raises(ConfigError, match="num_virtual_tokens must be >= 1; got 0"):
        PrefixConfig(2, 2, 4, 0)


def test_prefix_is_trainable_end_to_end():
    # Prepare
    model = build_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    prefix = Prefix(PrefixConfig.for_model(model.config, 2, projection_dim=8))
    ids = torch.randint(3, 90, (2, 6))
    logits = forward_with_prefix(model, ids, torch.ones_like(ids), prefix())

    # Execute
    logits.sum().backward()

    # Assert: gradients reach the reparameterisation, never the frozen model
    assert prefix.embedding.grad is not None and prefix.mlp[0].weight.grad is not None
    assert all(p.grad is None for p in model.parameters())


# The latent-attention layout: keys and values of different widths in one padded tensor.


def test_latent_attention_prefix_records_each_layers_widths_and_pads_with_zeros():
    # Prepare: DeepSeek-V3 caches a 20-wide latent as keys and an 8-wide rotary key as values
    config = PrefixConfig.for_model(tiny_config("deepseek_v3"), 3)

    # Execute
    kv = Prefix(config)()

    # Assert
    assert kv.shape == (4, 2, 1, 3, 20)
    assert config.layers_kv == ((1, 20, 8),) * 4
    assert (kv[:, 1, :, :, 8:] == 0).all() and (kv[:, 1, :, :, :8] != 0).all()


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_padding_stays_zero_through_training_and_files(tmp_path, projection_dim):
    # Prepare
    model = build_tiny_model("deepseek_v3")
    prefix = Prefix(PrefixConfig.for_model(model.config, 3, projection_dim=projection_dim))
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=0.1, weight_decay=0.1)
    ids = torch.randint(3, 96, (2, 5))

    # Execute: a few steps, then a save/load round trip
    for _ in range(3):
        optimizer.zero_grad()
        forward_with_prefix(model, ids, torch.ones_like(ids), prefix()).logsumexp(-1).mean().backward()
        optimizer.step()
    back = Prefix.load(prefix.save(tmp_path))

    # Assert
    assert (prefix()[:, 1, :, :, 8:] == 0).all()
    assert back.config == prefix.config
    torch.testing.assert_close(back(), prefix(), atol=0, rtol=0)


def test_a_prefix_with_another_layout_does_not_fit():
    config = tiny_config("deepseek_v3")
    uniform = dataclasses.replace(PrefixConfig.for_model(config, 3), layers_kv=None)
    with pytest.raises(ShapeMismatchError, match="its layers hold"):
        uniform.check_fits(config)


def test_layers_kv_wider_than_the_tensor_is_rejected():
    with pytest.raises(ConfigError, match="layers_kv must give 2"):
        PrefixConfig(2, 1, 8, 3, layers_kv=((1, 8, 8), (1, 9, 8)))


def test_a_layout_without_padding_is_the_plain_config():
    assert PrefixConfig(2, 1, 8, 3, layers_kv=[[1, 8, 8], [1, 8, 8]]) == PrefixConfig(2, 1, 8, 3)
