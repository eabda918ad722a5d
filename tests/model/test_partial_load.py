"""Partial loading reads only the parts asked for, and the bottom's fingerprint hashed straight from
the checkpoint is the one hashed from a loaded model."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoConfig

from conftest import build_tiny_model
from splitprefix.errors import ConfigError
from splitprefix.model.emulator import bottom_fingerprint, stored_bottom_fingerprint
from splitprefix.model.loading import load_causal_lm
from splitprefix.model.partial_load import INDEX_FILE, CheckpointReader, load_parts, meta_model
from splitprefix.model.registry import architecture_of
from splitprefix.model.split import Bottom, Head

SPLIT_AT = 2


def _old_digest(model, split_at):
    """The bottom fingerprint exactly as manifests and servers computed it before streaming."""
    tensors = dict(Bottom(model, split_at).state_dict())
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().float().contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _stored(path):
    skeleton = meta_model(AutoConfig.from_pretrained(path))
    return stored_bottom_fingerprint(CheckpointReader(path), skeleton, SPLIT_AT)


@pytest.mark.parametrize("storage", ["fp32", "bf16", "sharded"])
def test_fingerprint_hashed_from_the_checkpoint_equals_the_loaded_models(arch, tmp_path, storage):
    # Prepare
    model = build_tiny_model(arch)
    if storage == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if storage == "sharded" else {}))
    assert (tmp_path / INDEX_FILE).is_file() == (storage == "sharded")

    # Execute
    streamed = _stored(tmp_path)

    # Assert: the same digest as before, whichever dtype the model is loaded in
    loaded = load_causal_lm(tmp_path)
    assert streamed == _old_digest(loaded, SPLIT_AT) == bottom_fingerprint(loaded, SPLIT_AT)
    if storage == "bf16":  # a bf16 checkpoint loaded in bf16 holds the same values
        assert streamed == bottom_fingerprint(load_causal_lm(tmp_path, torch.bfloat16), SPLIT_AT)


def test_load_parts_reads_only_the_chosen_parts(arch, tmp_path, monkeypatch):
    # Prepare
    build_tiny_model(arch).save_pretrained(tmp_path)
    read: list[str] = []
    real = CheckpointReader.tensor
    monkeypatch.setattr(CheckpointReader, "tensor", lambda self, name: read.append(name) or real(self, name))

    # Execute
    model, (bottom, head) = load_parts(tmp_path, lambda m: (Bottom(m, SPLIT_AT), Head(m)), torch.bfloat16)

    # Assert: no tensor of layers [K, L) was read; the parts are real, frozen and bf16
    layers = "{0.backbone}.{0.layers}.".format(architecture_of(model.config))
    upper = [n for n in read if n.startswith(layers) and int(n[len(layers) :].split(".")[0]) >= SPLIT_AT]
    assert read and not upper
    for part in (bottom, head):
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in part.parameters())
    assert all(p.is_meta for p in architecture_of(model.config).layers_of(model)[SPLIT_AT:].parameters())
    whole = load_causal_lm(tmp_path, torch.bfloat16)
    for name, tensor in Bottom(whole, SPLIT_AT).state_dict().items():
        assert torch.equal(bottom.state_dict()[name], tensor), name


def test_a_tied_head_stays_tied_to_the_embedding(tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path)  # GPT-2 ties its LM head to its embedding
    _, (bottom, head) = load_parts(tmp_path, lambda m: (Bottom(m, SPLIT_AT), Head(m)))
    assert head.lm_head.weight is bottom.embeddings.tokens.weight


def test_a_checkpoint_without_safetensors_is_a_clear_error(tmp_path):
    build_tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"no model\.safetensors"):
        load_parts(tmp_path, lambda m: (Head(m),))
