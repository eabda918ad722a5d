"""`splitprefix train` and `splitprefix eval --server` against a real server on loopback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from split_helpers import EXAMPLES, write_jsonl
from splitprefix.cli.main import app
from splitprefix.model.prefix import Prefix, PrefixConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(dirs, server, tmp_path_factory):
    """A prefix trained through the split from the command line, and its data."""
    root = tmp_path_factory.mktemp("run")
    data, held_out = write_jsonl(root / "train.jsonl"), write_jsonl(root / "test.jsonl", EXAMPLES[:4])
    out = root / "prefix"
    args = ["train", str(dirs.emulator), "--server", server.url, "--data", str(data), "--out", str(out)]
    args += ["--eval-data", str(held_out), "--steps", "3", "--batch-size", "4", "--prefix-len", "2"]
    args += ["--eval-every", "2", "--head", "server", "--lr", "0.05"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, held_out


def evaluate(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_train_help_lists_the_options():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--server", "--init", "--head", "--token", "--wire-dtype", "--grad-accum", "--eval-every"):
        assert option in result.output


def test_train_writes_a_full_layout_prefix_its_settings_and_metrics(dirs, trained):
    out, _ = trained
    assert Prefix.load(out).config.num_layers == 4  # every layer of the full model, not the emulator's 3
    run = json.loads((out / "train_config.json").read_text())
    assert run["layout"] == "full" and run["client"]["head"] == "server" and "token" not in run["client"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(line["bytes_sent"] > 0 and line["bytes_received"] > 0 for line in lines)
    assert "eval_loss" in lines[1] and "eval_loss" not in lines[0]
    assert {"loss", "exact_match"} <= set(json.loads((out / "eval.json").read_text())["held_out"])


@pytest.mark.parametrize("head", ["client", "server"])
def test_eval_through_the_split_equals_whole_model_eval(dirs, server, trained, head):
    prefix, data = trained
    whole = evaluate(str(dirs.full), "--data", str(data), "--prefix", str(prefix))
    split = evaluate(
        str(dirs.emulator),
        "--data",
        str(data),
        "--prefix",
        str(prefix),
        "--server",
        server.url,
        "--head",
        head,
    )
    assert split["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert (split["n_tokens"], split["exact_match"]) == (whole["n_tokens"], whole["exact_match"])
    assert [s["predicted"] for s in split["samples"]] == [s["predicted"] for s in whole["samples"]]


def test_eval_through_the_split_without_a_prefix_equals_the_base_model(dirs, server, trained):
    _, data = trained
    whole = evaluate(str(dirs.full), "--data", str(data), "--no-exact-match")
    split = evaluate(str(dirs.emulator), "--data", str(data), "--server", server.url, "--no-exact-match")
    assert split["loss"] == pytest.approx(whole["loss"], abs=1e-5)


def test_train_from_an_emulator_layout_prefix_says_to_integrate_it(dirs, server, trained, tmp_path):
    emulator_layout = tmp_path / "emu-prefix"
    Prefix(PrefixConfig(3, 2, 16, 2)).save(emulator_layout)  # K + N = 3 emulator layers
    args = ["train", str(dirs.emulator), "--server", server.url, "--data", str(trained[1])]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--init", str(emulator_layout)])
    assert result.exit_code != 0
    assert "splitprefix integrate" in str(result.exception)


def test_train_and_eval_with_noise_record_it_and_change_the_numbers(dirs, server, trained, tmp_path):
    # Prepare
    prefix, data = trained
    out = tmp_path / "noisy"
    args = ["train", str(dirs.emulator), "--server", server.url, "--data", str(data), "--out", str(out)]
    args += ["--steps", "1", "--batch-size", "2", "--prefix-len", "2", "--eval-data", str(data)]

    # Execute
    result = runner.invoke(app, [*args, "--clip", "0.2", "--noise", "0.5", "--noise-seed", "4"])
    clean = evaluate(str(dirs.emulator), "--data", str(data), "--prefix", str(prefix), "--server", server.url)
    noisy = evaluate(
        *(str(dirs.emulator), "--data", str(data), "--prefix", str(prefix), "--server", server.url),
        *("--clip", "0.2", "--noise", "0.5", "--noise-seed", "4"),  # seeded: unseeded noise may change little
    )

    # Assert
    assert result.exit_code == 0, result.output
    privacy = json.loads((out / "train_config.json").read_text())["config"]["privacy"]
    assert privacy == {"clip_norm": 0.2, "noise_multiplier": 0.5, "seed": 4}
    assert noisy["loss"] != pytest.approx(clean["loss"], abs=1e-3)


def test_noise_without_a_clip_norm_is_refused(dirs, server, trained, tmp_path):
    args = ["train", str(dirs.emulator), "--server", server.url, "--data", str(trained[1])]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--noise", "1"])
    assert result.exit_code != 0
    assert "needs clip_norm" in str(result.exception)


def test_two_noisy_evaluations_differ_unless_a_seed_is_given(dirs, server, trained):
    # Prepare: the attack was that two runs of `eval --clip 30 --noise 0.5` agreed to the digit
    prefix, data = trained
    args = [str(dirs.emulator), "--data", str(data), "--prefix", str(prefix), "--server", server.url]
    args += ["--clip", "30", "--noise", "0.5", "--no-exact-match"]

    # Execute
    fresh = [evaluate(*args) for _ in range(2)]
    seeded = [evaluate(*args, "--noise-seed", "7")["loss"] for _ in range(2)]

    # Assert: fresh OS noise every run; an explicit seed replays exactly; each run accounts its releases
    assert fresh[0]["loss"] != fresh[1]["loss"]
    assert seeded[0] == seeded[1]
    assert fresh[0]["privacy"]["epsilon"] > 0 and fresh[0]["privacy"]["token_releases"]["evaluated"] > 0


def test_train_with_noise_prints_and_saves_epsilon_and_no_seed(dirs, server, trained, tmp_path):
    # Prepare
    _, data = trained
    out = tmp_path / "accounted"
    args = ["train", str(dirs.emulator), "--server", server.url, "--data", str(data), "--out", str(out)]
    args += ["--steps", "2", "--batch-size", "2", "--prefix-len", "2", "--clip", "1", "--noise", "40"]

    # Execute
    result = runner.invoke(app, args)

    # Assert
    assert result.exit_code == 0, result.output
    run = json.loads((out / "train_config.json").read_text())
    assert run["config"]["privacy"]["seed"] is None
    epsilon = run["privacy"]["epsilon"]
    assert epsilon > 0 and f"epsilon: {epsilon:.4g} at delta 1e-05" in result.output
