"""The prefix must mean the same thing to splitprefix and to PEFT's prefix tuning."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from conftest import build_tiny_model, random_batch
from splitprefix.errors import ConfigError
from splitprefix.model.peft_io import ADAPTER_CONFIG, export_peft, import_peft
from splitprefix.model.prefix import Prefix, PrefixConfig, kv_to_rows
from splitprefix.model.prefixed import forward_split
from splitprefix.model.split import split_model

TOL = dict(atol=1e-5, rtol=1e-5)


def _prefix(model, seed=3, **kwargs):
    torch.manual_seed(seed)
    return Prefix(PrefixConfig.for_model(model.config, 5, init_std=1.0, **kwargs))


@pytest.mark.parametrize("padding", [None, "right"])
def test_split_with_prefix_equals_peft_prefix_tuning(arch, padding):
    # Prepare: a PEFT model whose prefix encoder holds the same keys/values
    model = build_tiny_model(arch)
    prefix = _prefix(model)
    ids, mask = random_batch(padding=padding)
    with torch.no_grad():
        split_logits = forward_split(split_model(model, 2), ids, mask, prefix())
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(kv_to_rows(prefix().detach()))

    # Execute
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, attention_mask=mask).logits

    # Assert
    real = mask.bool()
    torch.testing.assert_close(split_logits[real], peft_logits[real], **TOL)


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_exported_adapter_loads_in_peft_and_reproduces_logits(arch, projection_dim, tmp_path):
    # Prepare
    model = build_tiny_model(arch)
    prefix = _prefix(model, projection_dim=projection_dim)
    ids, mask = random_batch()
    with torch.no_grad():
        expected = forward_split(split_model(model, 1), ids, mask, prefix())

    # Execute
    export_peft(prefix, tmp_path, base_model_name_or_path="tiny")
    peft_model = PeftModel.from_pretrained(model, tmp_path)
    with torch.no_grad():
        actual = peft_model(input_ids=ids, attention_mask=mask).logits

    # Assert
    torch.testing.assert_close(actual, expected, **TOL)


def test_import_round_trips_an_export(tmp_path):
    model = build_tiny_model("qwen2")
    prefix = _prefix(model, projection_dim=8)
    export_peft(prefix, tmp_path)
    back = import_peft(tmp_path)
    assert back.config.projection_dim is None
    torch.testing.assert_close(back(), prefix().detach(), atol=0, rtol=0)


def test_import_rejects_other_adapter_types(tmp_path):
    model = build_tiny_model("llama")
    export_peft(_prefix(model), tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**raw, "peft_type": "LORA"}))
    with pytest.raises(ConfigError, match=r"PREFIX_TUNING.*LORA"):
        import_peft(tmp_path)


def test_import_of_a_missing_directory_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        import_peft(tmp_path / "nowhere")


def test_a_latent_attention_prefix_is_refused_with_the_widths(tmp_path):
    prefix = _prefix(build_tiny_model("deepseek_v3"))
    with pytest.raises(ConfigError, match="keys 20 and values 8 wide"):
        export_peft(prefix, tmp_path)
    assert not (tmp_path / ADAPTER_CONFIG).exists()
