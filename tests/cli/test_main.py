"""The `splitprefix` command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import TOKENIZER_VOCAB, build_tiny_model, build_tiny_tokenizer
from splitprefix.cli.main import app
from splitprefix.errors import ShapeMismatchError
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.model.registry import ARCHITECTURES

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output


def test_info_prints_json(tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["architecture"] == "gpt2"


def test_info_without_a_model_lists_every_supported_family():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["supported_architectures"] == sorted(ARCHITECTURES)


def test_info_help_says_how_to_list_the_families():
    result = runner.invoke(app, ["info", "--help"])
    assert result.exit_code == 0
    assert "supported families" in result.output


def test_info_on_a_missing_directory_fails_cleanly(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert "not a model directory" in str(result.exception) + result.output


def test_eval_prints_a_json_report(tmp_path):
    # Prepare
    model_dir = tmp_path / "model"
    build_tiny_model("llama", vocab_size=TOKENIZER_VOCAB).save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "test.jsonl"
    data.write_text('{"prompt": "Customer: refund please\\nIntent:", "completion": " refund"}\n')
    prefix_dir = tmp_path / "prefix"
    Prefix(PrefixConfig(4, 2, 16, 3)).save(prefix_dir)

    # Execute
    result = runner.invoke(
        app, ["eval", str(model_dir), "--data", str(data), "--prefix", str(prefix_dir), "--json"]
    )

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"loss", "perplexity", "n_tokens", "exact_match"} <= set(report)


def test_eval_rejects_a_prefix_for_another_model(tmp_path):
    model_dir = tmp_path / "model"
    build_tiny_model("llama", vocab_size=TOKENIZER_VOCAB).save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "test.jsonl"
    data.write_text('{"text": "hello"}\n')
    Prefix(PrefixConfig(6, 2, 16, 3)).save(tmp_path / "prefix")
    result = runner.invoke(
        app, ["eval", str(model_dir), "--data", str(data), "--prefix", str(tmp_path / "prefix")]
    )
    assert isinstance(result.exception, ShapeMismatchError)


@pytest.mark.parametrize("command", ["generate", "gateway"])
def test_split_inference_commands_document_their_options(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--server", "--prefix", "--head", "--token", "--clip", "--noise"):
        assert option in result.output


def test_generate_streams_the_split_models_greedy_text(dirs, server):
    from splitprefix.data_party.generate import GenerationConfig, SplitModel
    from splitprefix.data_party.remote import ClientSettings

    with SplitModel.open(dirs.emulator, ClientSettings(server.url, head="client")) as model:
        expected = model.generate("The quick", GenerationConfig(max_new_tokens=5))[0].text
    args = ["generate", str(dirs.emulator), "The quick", "--server", server.url, "--max-new-tokens", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip("\n").endswith(expected)  # after the weight-loading bar


def test_generate_with_noise_but_no_clip_norm_is_refused(dirs, server):
    args = ["generate", str(dirs.emulator), "The quick", "--server", server.url, "--noise", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "needs clip_norm" in str(result.exception)


@pytest.mark.parametrize(
    "command", ["train-offsite", "train", "eval", "generate", "gateway", "privacy-audit"]
)
def test_every_data_party_command_takes_a_device_and_a_dtype(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--device" in result.output and "--dtype" in result.output


def test_a_device_this_machine_lacks_is_refused_with_what_to_do(tmp_path):
    result = runner.invoke(app, ["eval", "builtin", "--data", str(tmp_path / "x.jsonl"), "--device", "gpu"])
    assert result.exit_code != 0
    assert "device must be cpu, cuda, cuda:N or mps; got 'gpu'" in str(result.exception) + result.output


def test_generate_with_noise_reports_the_epsilon_of_its_prompt(dirs, server):
    # "The quick" plus 5 new tokens: the prompt's states once, then 4 single tokens (the last is never sent)
    from splitprefix.data_party.accounting import gaussian_epsilon
    from splitprefix.model.loading import load_tokenizer

    prompt_tokens = len(load_tokenizer(dirs.emulator)("The quick")["input_ids"])
    args = ["generate", str(dirs.emulator), "The quick", "--server", server.url, "--max-new-tokens", "5"]

    result = CliRunner().invoke(app, [*args, "--clip", "1", "--noise", "30"])

    assert result.exit_code == 0, result.output
    assert f"epsilon: {gaussian_epsilon(30.0, prompt_tokens + 4):.4g} at delta 1e-05" in result.output
