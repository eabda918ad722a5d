"""Offsite training on the emulator and integration into the full model's layout."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from conftest import TOKENIZER_VOCAB, build_tiny_model, build_tiny_tokenizer
from splitprefix.cli.main import app
from splitprefix.errors import ShapeMismatchError
from splitprefix.model.emulator import EmulatorManifest, integrate_kv
from splitprefix.model.prefix import Prefix
from splitprefix.model_party.compress import emulate

runner = CliRunner()


@pytest.fixture
def emulator_dir(tmp_path):
    full = tmp_path / "full"
    build_tiny_model("llama", num_layers=8, vocab_size=TOKENIZER_VOCAB).save_pretrained(full)
    build_tiny_tokenizer().save_pretrained(full)
    emulate(str(full), split_at=2, keep=2, out=tmp_path / "emu")
    return tmp_path / "emu"


def test_integration_maps_kept_layers_one_to_one_and_dropped_to_stand_ins(emulator_dir):
    # Prepare: emulator layers 0..3 are originals [0, 1, 3, 6]
    manifest = EmulatorManifest.load(emulator_dir)
    kv = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 2, 2, 3, 16)

    # Execute
    stand_in = integrate_kv(kv, manifest)
    zeros = integrate_kv(kv, manifest, dropped="zeros")

    # Assert: a layer-drop emulator's default is the stand-in's prefix
    assert stand_in[:, 0, 0, 0, 0].tolist() == [0, 1, 2, 2, 2, 3, 3, 3]
    assert zeros[:, 0, 0, 0, 0].tolist() == [0, 1, 0, 2, 0, 0, 3, 0]


def test_a_distilled_emulators_dropped_layers_get_zeros_by_default(emulator_dir):
    # Prepare: the same emulator's manifest, as distillation would record it
    manifest = replace(EmulatorManifest.load(emulator_dir), distillation={"steps": 100})
    kv = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 2, 2, 3, 16)

    # Execute
    default = integrate_kv(kv, manifest)

    # Assert
    assert default[:, 0, 0, 0, 0].tolist() == [0, 1, 0, 2, 0, 0, 3, 0]
    assert integrate_kv(kv, manifest, "stand-in")[:, 0, 0, 0, 0].tolist() == [0, 1, 2, 2, 2, 3, 3, 3]


def test_prefix_from_another_emulator_is_rejected(emulator_dir):
    manifest = EmulatorManifest.load(emulator_dir)
    with pytest.raises(ShapeMismatchError, match="has 5 layers; this emulator has 4"):
        integrate_kv(torch.zeros(5, 2, 2, 3, 16), manifest)


def test_offsite_train_then_integrate_from_the_command_line(emulator_dir, tmp_path):
    # Prepare
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Customer: refund order {i}\nIntent:", "completion": " refund"} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix_dir, full_prefix = tmp_path / "prefix", tmp_path / "full-prefix"

    # Execute
    trained = runner.invoke(
        app,
        [
            "train-offsite",
            str(emulator_dir),
            "--data",
            str(data),
            "--out",
            str(prefix_dir),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--prefix-len",
            "3",
            "--checkpoint-every",
            "2",
        ],
    )
    integrated = runner.invoke(
        app, ["integrate", str(prefix_dir), "--emulator", str(emulator_dir), "--out", str(full_prefix)]
    )

    # Assert
    assert trained.exit_code == 0, trained.output
    assert integrated.exit_code == 0, integrated.output
    report = json.loads((prefix_dir / "eval.json").read_text())
    assert report["steps"] == 4 and {"loss", "exact_match"} <= set(report["held_out"])
    assert json.loads((prefix_dir / "train_config.json").read_text())["config"]["prefix_len"] == 3
    assert not (prefix_dir / "checkpoint").exists()
    assert Prefix.load(full_prefix).config.num_layers == 8
    torch.testing.assert_close(Prefix.load(full_prefix)()[6], Prefix.load(prefix_dir)()[3])


def test_emulate_rejects_keep_too_large(tmp_path):
    full = tmp_path / "full"
    build_tiny_model("gpt2", num_layers=4).save_pretrained(full)
    result = runner.invoke(
        app, ["emulate", str(full), "--split-at", "2", "--keep", "2", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code != 0
    assert "N < L - K = 2" in str(result.exception)
