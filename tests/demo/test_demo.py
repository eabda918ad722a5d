"""`splitprefix demo --quick`: the whole system end to end on the shipped model, and its report."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import signal

import httpx
import pytest
from typer.testing import CliRunner

from splitprefix.cli.main import app
from splitprefix.data.synthetic import ANSWERS
from splitprefix.demo import report
from splitprefix.demo.config import DemoConfig
from splitprefix.demo.measure import per_intent
from splitprefix.demo.stages import DemoStageError, StageClock
from splitprefix.errors import ConfigError

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_help_lists_the_options():
    result = runner.invoke(app, ["demo", "--help"])

    assert result.exit_code == 0
    for option in ("--out", "--parties", "--quick"):
        assert option in result.output


def test_a_failing_stage_is_named_with_what_to_do():
    lines: list[str] = []
    clock = StageClock(total=2, echo=lines.append)

    with pytest.raises(DemoStageError) as raised, clock.stage("federation", "rounds", "check the log"):
        raise RuntimeError("party 1 lost the server")

    message = str(raised.value)
    assert "stage 1/2 'federation'" in message and "party 1 lost the server" in message
    assert "What to do: check the log" in message
    assert lines == ["[1/2] federation: rounds"] and clock.wall_s == {}


def test_an_interrupt_swallowed_inside_a_stage_still_ends_the_run():
    # Prepare: Ctrl-C arrives while a library call that catches KeyboardInterrupt runs
    clock = StageClock(total=2, echo=lambda line: None)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job

    # Execute / Assert
    with (
        pytest.raises(KeyboardInterrupt),
        clock.catching_interrupts(),
        clock.stage("federation", "", ""),
        contextlib.suppress(KeyboardInterrupt),  # what the library does
    ):
        signal.raise_signal(signal.SIGINT)
    assert clock.interrupted and clock.wall_s == {}
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_demo_config_rejects_too_few_examples_for_the_parties():
    with pytest.raises(ConfigError, match="too small for 50 parties"):
        DemoConfig(n_train=300, parties=50)


def test_accuracy_per_intent_and_the_samples_shown_are_counted_not_picked():
    # Prepare: 3 held-out answers of one intent (1 right), 2 of another (both right)
    rows = [
        {"prompt": f"m{k}", "intent": intent, "expected": answer, "generated": said, "match": answer == said}
        for k, (intent, answer, said) in enumerate(
            [("refund", "refund", "bill"), ("refund", "refund", "refund"), ("track_order", "track", "track"),
             ("refund", "refund", "bill"), ("track_order", "track", "track")]
        )
    ]  # fmt: skip
    results = {"generation": {"rows": rows}, "config": {"generation_prompts": 2}}

    # Execute
    intents = per_intent(rows)
    shown = report._shown_samples(results)

    # Assert
    assert intents == [
        {
            "intent": "refund",
            "answer": "refund",
            "examples": 3,
            "right": 1,
            "top_wrong": "bill",
            "top_wrong_count": 2,
        },
        {
            "intent": "track_order",
            "answer": "track",
            "examples": 2,
            "right": 2,
            "top_wrong": None,
            "top_wrong_count": 0,
        },
    ]
    assert [g["prompt"] for g in shown] == ["m0", "m1"]  # the first wrong and the first right, in order


def test_quick_demo_runs_end_to_end_and_writes_a_consistent_report(tmp_path):
    # Prepare
    out = tmp_path / "report"
    config = DemoConfig.preset(str(out), parties=3, quick=True)

    # Execute
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])

    # Assert: the command, one line per stage, and the files
    assert result.exit_code == 0, result.output
    assert all(f"[{k}/8]" in result.output for k in range(1, 9))
    results = json.loads((out / "results.json").read_text())
    pngs = {name: (out / name).read_bytes() for name in ("held_out.png", "loss_curves.png")}
    assert all(data.startswith(PNG_MAGIC) for data in pngs.values())
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "](held_out.png)" in markdown and "](loss_curves.png)" in markdown
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [pngs["held_out.png"], pngs["loss_curves.png"]]  # the same images, inlined
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")

    # Assert: the curves have one point per step or round that was run
    curves = results["curves"]
    assert [len(c) for c in curves["offsite"]] == [config.offsite_steps] * 3
    assert len(curves["single_split"]) == config.single_steps
    assert len(curves["central"]) == config.central_steps
    assert [r["round"] for r in curves["federation"]] == list(range(1, config.rounds + 1))

    # Assert: the scores are measured and make sense. At the quick budget exact match on 30 examples
    # is mostly 0 or a few hits, so the losses are compared.
    s = results["scores"]
    assert all(s[name]["loss"] < s["base"]["loss"] - 2.0 for name in ("offsite", "federated", "central"))
    assert s["federated"]["loss"] < s["offsite"]["loss"]
    assert all(0.0 <= s[name]["exact_match"] <= 1.0 for name in s if name != "offsite_each_party")
    # the operator's last held-out loss, measured through the split, is the whole model's to 1e-3
    assert curves["federation"][-1]["eval_loss"] == pytest.approx(s["federated"]["loss"], abs=1e-3)
    assert f"| federated | {s['federated']['loss']:.2f} |" in markdown

    # Assert: traffic, generation, speed and timing were measured
    wire = {w["stage"]: w for w in results["wire"]}
    split = wire["split training (party 0)"]
    assert split["bytes_sent"] > 0 and split["bytes_received"] > 0 and split["tokens"] > 0
    assert wire["federation: prefixes to and from the Flower server"]["bytes"] > 0
    generation = results["generation"]
    rows = generation["rows"]
    assert len(rows) == config.n_test  # every held-out prompt, through the split
    assert all(r["expected"] in ANSWERS.values() and isinstance(r["generated"], str) for r in rows)
    assert sum(i["examples"] for i in generation["per_intent"]) == config.n_test
    assert generation["exact_match"] == pytest.approx(sum(r["match"] for r in rows) / config.n_test, abs=1e-4)
    assert "| intent | answer | held-out | right | accuracy |" in markdown
    assert [r["batch"] for r in results["speed"]] == [1, config.generation_prompts]
    assert all(r["split_tokens_per_s"] > 0 and r["whole_tokens_per_s"] > 0 for r in results["speed"])
    stages = ["model party", "offsite", "split training", "federation", "central reference", "evaluation"]
    assert all(results["wall_s"][k] > 0 for k in [*stages, "generation", "total"])

    # Assert: the model party's server is gone
    with pytest.raises(httpx.ConnectError):
        httpx.get(results["server_url"] + "/v1/health", timeout=2)
