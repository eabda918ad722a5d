"""The emulator: layer drop keeps the bottom, norm, head and tokenizer bit-identical; distillation helps."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TOKENIZER_VOCAB, build_tiny_model, build_tiny_tokenizer
from splitprefix.errors import ConfigError
from splitprefix.model.emulator import (
    MANIFEST_FILE,
    EmulatorManifest,
    FingerprintMismatchError,
    bottom_fingerprint,
    top_fingerprint,
    uniform_keep,
    verify_bottom,
)
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.partial_load import CheckpointReader
from splitprefix.model.registry import architecture_of
from splitprefix.model.split import Bottom, Head, LayerStack
from splitprefix.model_party.compress import (
    DistillConfig,
    _Distiller,
    build_emulator,
    corpus_blocks,
    distill,
    emulate,
    make_manifest,
)
from splitprefix.model_party.teacher import LoadedTeacher, StreamedTeacher


def _save_full(tmp_path, arch="llama", num_layers=6, seed=0):
    path = tmp_path / f"full-{arch}-{seed}"
    build_tiny_model(arch, num_layers=num_layers, vocab_size=TOKENIZER_VOCAB, seed=seed).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def test_uniform_keep_takes_the_middle_of_equal_chunks():
    assert uniform_keep(8, 2, 2) == [3, 6]
    assert uniform_keep(8, 2, 3) == [3, 5, 7]
    assert uniform_keep(6, 1, 1) == [3]


def test_emulator_keeps_bottom_norm_head_and_tokenizer_bit_identical(arch, tmp_path):
    # Prepare
    full_dir = _save_full(tmp_path, arch)
    full = load_causal_lm(full_dir)

    # Execute
    manifest = emulate(str(full_dir), split_at=2, keep=2, out=tmp_path / "emu")
    emulator = AutoModelForCausalLM.from_pretrained(tmp_path / "emu")

    # Assert
    for name, tensor in Bottom(full, 2).state_dict().items():
        assert torch.equal(Bottom(emulator, 2).state_dict()[name], tensor), name
    for name, tensor in Head(full).state_dict().items():
        assert torch.equal(Head(emulator).state_dict()[name], tensor), name
    assert emulator.config.num_hidden_layers == 4 and manifest.kept_layers == [0, 1, 3, 5]
    full_upper = Bottom(full, 4).stack.layers[3].state_dict()  # original layer 3 is emulator layer 2
    for name, tensor in Bottom(emulator, 4).stack.layers[2].state_dict().items():
        assert torch.equal(tensor, full_upper[name])
    verify_bottom(EmulatorManifest.load(tmp_path / "emu"), emulator, load_tokenizer(tmp_path / "emu"))


def test_manifest_round_trips_and_maps_dropped_layers_to_stand_ins(tmp_path):
    full_dir = _save_full(tmp_path, num_layers=8)
    manifest = emulate(str(full_dir), split_at=2, keep=2, out=tmp_path / "emu")
    loaded = EmulatorManifest.load(tmp_path / "emu")
    assert loaded == manifest
    assert loaded.kept_layers == [0, 1, 3, 6]
    # originals 0..7 -> emulator layers; 3 and 6 map to themselves (2, 3)
    assert loaded.layer_map == [0, 1, 2, 2, 2, 3, 3, 3]


def test_bottom_from_another_model_is_detected(tmp_path):
    emulate(str(_save_full(tmp_path, seed=0)), split_at=2, keep=1, out=tmp_path / "emu")
    other = load_causal_lm(_save_full(tmp_path, seed=1))
    manifest = EmulatorManifest.load(tmp_path / "emu")
    with pytest.raises(FingerprintMismatchError, match="bottom 2 layers differ"):
        verify_bottom(manifest, other, build_tiny_tokenizer())


def test_an_emulator_over_its_own_model_is_refused(tmp_path):
    full_dir = _save_full(tmp_path)
    with pytest.raises(ConfigError, match="model's own directory"):
        emulate(str(full_dir), split_at=2, keep=1, out=full_dir)
    assert load_causal_lm(full_dir).config.num_hidden_layers == 6  # untouched


def test_fingerprint_ignores_the_load_dtype():
    model = build_tiny_model("llama")
    assert bottom_fingerprint(model, 2) == bottom_fingerprint(model.to(torch.float64), 2)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"base_model": "x"}), "[]"])
def test_corrupt_manifest_is_a_clear_error(tmp_path, content):
    (tmp_path / MANIFEST_FILE).write_text(content)
    with pytest.raises(ConfigError, match="corrupt"):
        EmulatorManifest.load(tmp_path)


@pytest.mark.parametrize(
    ("split_at", "keep", "message"), [(2, 4, r"N < L - K = 4"), (2, 0, "N < L"), (6, 1, "K < L=6")]
)
def test_bad_keep_or_split_is_rejected(split_at, keep, message):
    with pytest.raises(ConfigError, match=message):
        build_emulator(build_tiny_model("llama", num_layers=6), split_at, keep)


def test_distillation_narrows_the_gap_and_never_touches_the_bottom(tmp_path):
    # Prepare
    full = build_tiny_model("llama", num_layers=6)
    emulator, _ = build_emulator(full, 2, 1)
    before = bottom_fingerprint(emulator, 2)
    blocks = torch.randint(3, 96, (48, 16), generator=torch.Generator().manual_seed(0))
    config = DistillConfig(steps=30, lr=3e-3, batch_size=8, eval_blocks=8, checkpoint_every=0, prefix_len=0)

    # Execute
    report = distill(LoadedTeacher(full, 2), emulator, 2, blocks, config)

    # Assert
    gap_before = abs(report["emulator_perplexity_before"] - report["full_perplexity"])
    gap_after = abs(report["emulator_perplexity_after"] - report["full_perplexity"])
    assert gap_after < gap_before
    assert bottom_fingerprint(emulator, 2) == before
    assert not any(p.requires_grad for p in emulator.parameters())


def test_distillation_leaves_the_layers_shipped_for_the_u_split_as_the_models(tmp_path):
    # Prepare: 6 layers, K = 2, N = 3 of which the last M = 1 is the model's layer 5
    full = build_tiny_model("llama", num_layers=6)
    emulator, kept = build_emulator(full, 2, 3, client_layers=1)
    middle = [p.clone() for p in architecture_of(emulator.config).layers_of(emulator)[2].parameters()]
    blocks = torch.randint(3, 96, (48, 16), generator=torch.Generator().manual_seed(0))
    config = DistillConfig(steps=5, lr=3e-3, batch_size=8, eval_blocks=8, checkpoint_every=0, prefix_len=0)

    # Execute
    distill(LoadedTeacher(full, 2), emulator, 2, blocks, config, client_layers=1)

    # Assert: the stand-in layers learnt, the shipped one is still the model's, bit for bit
    assert kept == [0, 1, 2, 4, 5]
    layers = architecture_of(emulator.config).layers_of(emulator)
    assert any(not torch.equal(a, b) for a, b in zip(middle, layers[2].parameters(), strict=True))
    assert top_fingerprint(emulator, 1) == top_fingerprint(full, 1)


def test_distillation_resumes_from_its_checkpoint_after_a_crash(tmp_path, monkeypatch):
    # Prepare
    full = build_tiny_model("gpt2", num_layers=4)
    blocks = torch.randint(3, 96, (24, 8), generator=torch.Generator().manual_seed(0))
    config = DistillConfig(
        steps=6, batch_size=4, eval_blocks=4, checkpoint_every=3, loss="both", prefix_len=0
    )
    straight, _ = build_emulator(full, 1, 1)
    distill(LoadedTeacher(full, 1), straight, 1, blocks, config)

    # Execute: crash during step 5, after the checkpoint of step 3, then rerun the same job
    real_loss, calls = _Distiller.loss, []

    def crashing_loss(self, batch, target, kind, kv=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(self, batch, target, kind, kv)

    crashed, _ = build_emulator(full, 1, 1)
    monkeypatch.setattr(_Distiller, "loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        distill(LoadedTeacher(full, 1), crashed, 1, blocks, config, tmp_path / "ckpt")
    monkeypatch.setattr(_Distiller, "loss", real_loss)
    resumed, _ = build_emulator(full, 1, 1)
    distill(LoadedTeacher(full, 1), resumed, 1, blocks, config, tmp_path / "ckpt")

    # Assert
    assert (tmp_path / "ckpt" / "step-0000006").is_dir()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    ("variant", "fields"), [("qwen3_moe", {}), ("deepseek_v3", {"first_k_dense_replace": 3})]
)
def test_an_moe_emulator_keeps_each_kept_layers_dense_or_sparse_kind(variant, fields):
    # Prepare: kept layers [0, 1, 3]; qwen3_moe's sparse grid and DeepSeek's dense block both move
    model = build_tiny_model(variant)
    for name, value in fields.items():
        setattr(model.config, name, value)
    model = AutoModelForCausalLM.from_config(model.config).eval()

    # Execute
    emulator, kept = build_emulator(model, 2, 1)

    # Assert: each emulator layer is a bit-identical copy of its original, MLP kind included
    layers = architecture_of(model.config).layers_of
    originals = layers(model)
    for new, old in enumerate(kept):
        ours = layers(emulator)[new].state_dict()
        assert ours.keys() == originals[old].state_dict().keys()
        for name, tensor in originals[old].state_dict().items():
            assert torch.equal(ours[name], tensor), (new, name)


def _saved_tensors(directory):
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    return {name: tensor for f in files for name, tensor in load_file(f).items()}


@pytest.mark.parametrize(
    ("arch", "storage"), [("llama", "fp32"), ("llama", "bf16"), ("gpt2", "fp32"), ("llama", "sharded")]
)
def test_streamed_emulator_equals_the_one_built_from_the_loaded_model(tmp_path, arch, storage):
    # Prepare: the whole model saved as given, and the emulator built the old way, from it loaded whole
    full = build_tiny_model(arch, num_layers=8, vocab_size=TOKENIZER_VOCAB)
    full_dir, dtype = tmp_path / "full", torch.bfloat16 if storage == "bf16" else torch.float32
    shards = {"max_shard_size": "60KB"} if storage == "sharded" else {}
    full.to(dtype).save_pretrained(full_dir, **shards)
    assert (full_dir / "model.safetensors.index.json").is_file() == (storage == "sharded")
    build_tiny_tokenizer().save_pretrained(full_dir)
    loaded, tokenizer = load_causal_lm(full_dir), load_tokenizer(full_dir)
    reference, kept = build_emulator(loaded, 2, 3)
    reference.to(dtype).save_pretrained(tmp_path / "old")  # in the stored dtype, as emulate always did
    old_manifest = make_manifest(str(full_dir), loaded, tokenizer, 2, kept)

    # Execute
    manifest = emulate(str(full_dir), split_at=2, keep=3, out=tmp_path / "new")

    # Assert: bit-identical tensors, config and manifest
    old, new = _saved_tensors(tmp_path / "old"), _saved_tensors(tmp_path / "new")
    assert sorted(old) == sorted(new)
    for name, tensor in old.items():
        assert tensor.dtype == new[name].dtype and torch.equal(tensor, new[name]), name
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == json.loads(
        (tmp_path / "old" / "config.json").read_text()
    )
    assert manifest == old_manifest == EmulatorManifest.load(tmp_path / "new")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_streamed_teacher_computes_what_the_loaded_one_does_one_layer_at_a_time(
    tmp_path, arch, monkeypatch
):
    # Prepare
    full_dir = _save_full(tmp_path, arch)
    full = load_causal_lm(full_dir)
    blocks = torch.randint(3, 96, (6, 9), generator=torch.Generator().manual_seed(0))
    read, held = [], []
    real = CheckpointReader.tensor
    monkeypatch.setattr(CheckpointReader, "tensor", lambda self, name: read.append(name) or real(self, name))

    # Execute: the teacher reads the full model's upper layers; bottom and head are the emulator's
    emulator, _ = build_emulator(full, 2, 1)
    teacher = StreamedTeacher(CheckpointReader(full_dir), full.config, Bottom(emulator, 2), Head(emulator), 2)
    real_stack = LayerStack.forward
    monkeypatch.setattr(
        LayerStack, "forward", lambda self, *a: held.append(_held(teacher)) or real_stack(self, *a)
    )
    streamed = teacher.targets(blocks, 4)

    # Assert: bit-identical, each upper layer read once, never two of them held at a time
    assert torch.equal(streamed, LoadedTeacher(full, 2).targets(blocks, 4))
    layers = "{0.backbone}.{0.layers}.".format(architecture_of(full.config))
    upper = {n.split(".")[2] for n in read if n.startswith(layers)}
    assert upper == {"2", "3", "4", "5"} and len(read) == len(set(read))
    assert max(held) == 1 and _held(teacher) == 0


def _held(teacher):
    """How many of the teacher's layers hold real weights."""
    layers = architecture_of(teacher.skeleton.config).layers_of(teacher.skeleton)
    return sum(not next(layer.parameters()).is_meta for layer in layers)


def test_streamed_distillation_equals_distillation_against_the_loaded_model(tmp_path):
    # Prepare: a corpus, and the emulator distilled the old way, against the whole model in memory
    full_dir = _save_full(tmp_path, num_layers=6)
    corpus = tmp_path / "corpus.jsonl"
    text = " ".join(["The quick brown fox jumps over the lazy dog. A tokenizer turns text into ids."] * 4)
    corpus.write_text("".join(json.dumps({"prompt": text, "completion": f" {i}"}) + "\n" for i in range(40)))
    # a tiny budget: each chunk of teacher targets covers 2 steps, so the layers are read in 3 passes
    config = DistillConfig(
        steps=6, batch_size=2, eval_blocks=4, checkpoint_every=0, teacher_memory_mb=0.13, prefix_len=4
    )
    full, tokenizer = load_causal_lm(full_dir), load_tokenizer(full_dir)
    reference, kept = build_emulator(full, 2, 1)
    layer_map = make_manifest(str(full_dir), full, tokenizer, 2, kept).layer_map
    blocks = corpus_blocks(tokenizer, corpus)
    old = distill(LoadedTeacher(full, 2), reference, 2, blocks, config, layer_map=layer_map)

    # Execute
    manifest = emulate(str(full_dir), 2, 1, tmp_path / "emu", distill_data=corpus, distill_config=config)

    # Assert: the same trained layers and the same report, up to the summation order of perplexity
    new = _saved_tensors(tmp_path / "emu")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(new[name], tensor), name
    for key in ("full_perplexity", "emulator_perplexity_before", "emulator_perplexity_after"):
        assert manifest.distillation[key] == pytest.approx(old[key], rel=1e-5), key


def test_teachers_with_a_prefix_compute_what_the_whole_model_does_with_it(tmp_path):
    # Prepare: one deep prefix per batch of rows
    from splitprefix.model.prefix import PrefixConfig
    from splitprefix.model.prefixed import hidden_with_prefix

    full_dir = _save_full(tmp_path)
    full = load_causal_lm(full_dir)
    blocks = torch.randint(3, 96, (6, 9), generator=torch.Generator().manual_seed(0))
    kv_shape = PrefixConfig.for_model(full.config, 3).kv_shape
    prefixes = [torch.randn(kv_shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    emulator, _ = build_emulator(full, 2, 1)
    streamed = StreamedTeacher(
        CheckpointReader(full_dir), full.config, Bottom(emulator, 2), Head(emulator), 2
    )

    # Execute
    loaded = LoadedTeacher(full, 2).targets(blocks, 3, prefixes)
    read = streamed.targets(blocks, 3, prefixes)

    # Assert: both equal the whole model's forward with each batch's prefix, and the prefix matters
    whole = torch.cat(
        [
            hidden_with_prefix(full, b, torch.ones_like(b), kv)
            for b, kv in zip(blocks.split(3), prefixes, strict=True)
        ]
    )
    torch.testing.assert_close(loaded, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read, loaded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded, LoadedTeacher(full, 2).targets(blocks, 3), atol=1e-3)


def test_prefix_aware_distillation_narrows_the_gap_under_a_prefix(tmp_path):
    # Prepare: 8 layers, K = 2, N = 2; a held-out prefix, mapped onto the full model as integrate does
    from splitprefix.model.emulator import integrate_kv
    from splitprefix.model.prefix import PrefixConfig

    full = build_tiny_model("llama", num_layers=8)
    emulator, kept = build_emulator(full, 2, 2)
    manifest = make_manifest("tiny", full, build_tiny_tokenizer(), 2, kept)
    blocks = torch.randint(3, 96, (48, 12), generator=torch.Generator().manual_seed(0))
    kv = torch.randn(
        PrefixConfig.for_model(emulator.config, 4).kv_shape, generator=torch.Generator().manual_seed(9)
    )
    target = LoadedTeacher(full, 2).targets(blocks[:8], 8, [integrate_kv(kv, manifest, "stand-in")])

    def gap() -> float:
        student = LoadedTeacher(emulator, 2).targets(blocks[:8], 8, [kv])
        return float(torch.nn.functional.mse_loss(student, target))

    config = DistillConfig(
        steps=30, lr=3e-3, batch_size=8, eval_blocks=8, checkpoint_every=0, prefix_len=4, loss="both"
    )
    before = gap()

    # Execute
    distill(LoadedTeacher(full, 2), emulator, 2, blocks, config, layer_map=manifest.layer_map)

    # Assert
    assert gap() < 0.8 * before


def test_prefix_aware_distillation_needs_the_layer_map_and_sane_settings():
    full = build_tiny_model("llama", num_layers=6)
    emulator, _ = build_emulator(full, 2, 1)
    blocks = torch.randint(3, 96, (24, 8))
    with pytest.raises(ConfigError, match="layer_map"):
        distill(
            LoadedTeacher(full, 2), emulator, 2, blocks, DistillConfig(steps=1, eval_blocks=4, prefix_len=2)
        )
    with pytest.raises(ConfigError, match="prefix_std"):
        DistillConfig(prefix_len=2, prefix_std=0.0)


def test_emulate_distils_on_the_pretraining_corpus_with_prefixes(tmp_path, monkeypatch):
    # Prepare: the pretraining corpus stood in by random blocks (the real one needs WordNet)
    from splitprefix.model_party import compress

    asked = []
    blocks = torch.randint(3, 96, (24, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(compress, "_pretraining_blocks", lambda tok, chars: asked.append(chars) or blocks)
    config = DistillConfig(steps=2, batch_size=4, eval_blocks=4, prefix_len=2, corpus_chars=1000)

    # Execute
    manifest = emulate(str(_save_full(tmp_path, num_layers=8)), 2, 2, tmp_path / "emu", "pretraining", config)

    # Assert
    assert asked == [1000]
    assert manifest.distillation["config"]["prefix_len"] == 2 and manifest.distillation["train_blocks"] == 20


def test_the_emulate_command_distils_builtin_on_its_own_corpus_unless_told_not_to(monkeypatch):
    # Prepare: record what the command asks of emulate
    from typer.testing import CliRunner

    from splitprefix.cli.main import app
    from splitprefix.model_party import compress

    calls = []
    monkeypatch.setattr(compress, "emulate", lambda *a: calls.append(a) or _Stub())
    args = ["emulate", "builtin", "--split-at", "2", "--keep", "2", "--out", "unused"]

    # Execute
    results = [CliRunner().invoke(app, args + extra) for extra in ([], ["--no-distill"])]

    # Assert: the default is the measured recipe's distillation on the pretraining corpus
    assert [r.exit_code for r in results] == [0, 0], results[0].output
    assert calls[0][4] == compress.PRETRAINING_CORPUS and calls[1][4] is None
    assert calls[0][5] == DistillConfig()


class _Stub:
    kept_layers, num_layers, distillation = [0, 1, 3, 6], 8, None
