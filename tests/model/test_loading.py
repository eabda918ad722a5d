"""Loading models from a local directory."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, random_batch
from splitprefix.model.loading import describe_model, load_causal_lm


def test_saved_model_reloads_bit_exactly_and_frozen(arch, tmp_path):
    # Prepare
    model = build_tiny_model(arch)
    model.save_pretrained(tmp_path)
    ids, mask = random_batch()

    # Execute
    loaded = load_causal_lm(tmp_path)

    # Assert
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_describe_model_reports_the_prefix_layout(tmp_path):
    build_tiny_model("mistral").save_pretrained(tmp_path)
    info = describe_model(tmp_path)
    assert info["architecture"] == "mistral"
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"]) == (4, 2, 16)
    assert info["prefix_params_per_virtual_token"] == 4 * 2 * 2 * 16


def test_missing_model_directory_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="builtin"):
        load_causal_lm(tmp_path / "nowhere")
