"""Fingerprints that tie an emulator to its full model must not depend on how the model was loaded."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import build_tiny_model
from splitprefix.model.emulator import config_fingerprint
from splitprefix.model.loading import load_causal_lm


def test_config_fingerprint_ignores_load_path_and_dtype(tmp_path):
    # Prepare: a model stored in bf16, as the shipped one is, and a copy in another folder
    model = build_tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")

    # Execute: loaded in fp32 (the emulator builder) and built from its stored config (the server)
    fp32 = config_fingerprint(load_causal_lm(tmp_path / "a"))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "b"))

    # Assert
    assert config_fingerprint(skeleton) == fp32
    assert config_fingerprint(build_tiny_model("llama", num_layers=3)) != fp32
