"""The privacy audit's attacks on a tiny model, and the `privacy-audit` command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from split_helpers import EXAMPLES, write_jsonl
from splitprefix.audit.inversion import InversionConfig, invert, train_inverter
from splitprefix.audit.labels import label_recovery
from splitprefix.audit.nearest import nearest_neighbour_attack
from splitprefix.audit.observe import observe
from splitprefix.audit.run import AuditConfig, run_audit
from splitprefix.cli.main import app
from splitprefix.data.batching import encode_examples, resolve_pad_id
from splitprefix.data_party.privacy import HiddenPrivacy, PrivacyConfig
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.split import Bottom
from splitprefix.pretraining.corpus import python_topic_documents
from splitprefix.runtime import RuntimeSettings

runner = CliRunner()
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture(scope="module")
def tiny(dirs):
    """The tiny full model cut at K=1, its tokenizer, and the examples the data party sends."""
    model, tok = load_causal_lm(dirs.full), load_tokenizer(dirs.full)
    return model, tok, Bottom(model, 1), encode_examples(tok, EXAMPLES[:4], 64)


def random_kv(model, prefix_len: int, scale: float = 1.0) -> torch.Tensor:
    """A prefix the attacker does not know: (L, 2, n_kv, P, head_dim)."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    gen = torch.Generator().manual_seed(5)
    return (
        torch.randn(c.num_hidden_layers, 2, c.num_key_value_heads, prefix_len, head_dim, generator=gen)
        * scale
    )


def recovery(guesses, observations) -> float:
    hits = sum(int((g == o.token_ids).sum()) for g, o in zip(guesses, observations, strict=True))
    return hits / sum(len(o.token_ids) for o in observations)


def nearest_rate(tiny, kv, privacy: PrivacyConfig | None) -> float:
    _, _, bottom, encoded = tiny
    wire = HiddenPrivacy(privacy) if privacy is not None else None
    observations = observe(bottom, encoded, kv, 1, wire)
    clip = privacy.clip_norm if privacy is not None else None
    return recovery([nearest_neighbour_attack(bottom, o, clip) for o in observations], observations)


def test_nearest_neighbour_recovers_every_token_at_k1_without_noise(tiny):
    model = tiny[0]
    assert nearest_rate(tiny, random_kv(model, 0), None) == 1.0
    assert nearest_rate(tiny, random_kv(model, 3), None) >= 0.9  # the unknown bottom prefix barely hides them


def test_noise_lowers_what_nearest_neighbour_recovers(tiny):
    model = tiny[0]
    clean = nearest_rate(tiny, random_kv(model, 3), None)
    noisy = nearest_rate(tiny, random_kv(model, 3), PrivacyConfig(clip_norm=0.5, noise_multiplier=0.5))
    assert noisy < clean - 0.3


def test_learned_inversion_beats_chance_and_noise_lowers_it(tiny):
    model, tok, bottom, encoded = tiny
    docs, config = python_topic_documents(), InversionConfig(train_tokens=3000, steps=150, batch_size=256)
    kv = random_kv(model, 3)
    rates = []
    for privacy in (PrivacyConfig(), PrivacyConfig(clip_norm=0.5, noise_multiplier=0.5)):
        inverter = train_inverter(bottom, tok, docs, 3, privacy, config)
        wire = HiddenPrivacy(privacy) if privacy.enabled else None
        observations = observe(bottom, encoded, kv, 1, wire)
        rates.append(recovery([invert(inverter, o.hidden) for o in observations], observations))
    assert rates[0] > 0.3 and rates[1] < rates[0]  # chance is 1 / 320


def test_head_server_logit_gradients_reveal_every_target(tiny):
    model, tok, bottom, encoded = tiny
    kv = random_kv(model, 3, scale=0.1)
    noisy = HiddenPrivacy(PrivacyConfig(clip_norm=0.5, noise_multiplier=2.0))

    report = label_recovery(model, bottom, encoded, kv, 1, resolve_pad_id(tok), noisy, batch_size=3)

    assert report["recovery"] == 1.0 and report["n_targets"] > 4


def test_privacy_audit_command_prints_json_with_every_measure(dirs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl")
    held_out = write_jsonl(tmp_path / "test.jsonl", EXAMPLES[:2])
    args = ["privacy-audit", str(dirs.emulator), "--data", str(data), "--eval-data", str(held_out)]
    args += ["--split-at", "1", "--noise", "0", "--noise", "1", "--attack-tokens", "30", "--steps", "2"]
    args += [
        "--prefix-len",
        "2",
        "--inversion-tokens",
        "500",
        "--inversion-steps",
        "5",
        "--known-prefix",
        "--client-layers",
        "0",
        "--client-layers",
        "2",
        "--client-layers",
        "3",
        "--grad-noise",
        "32",
        "--json",
    ]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(row["split_at"], row["noise_multiplier"]) for row in report["settings"]] == [(1, 0.0), (1, 1.0)]
    off, noisy = report["settings"]
    assert off["clip_norm"] is None and noisy["clip_norm"] > 0
    for row in report["settings"]:
        attacks = (
            "nearest_neighbour",
            "nearest_neighbour_known_prefix",
            "learned_inversion",
            "head_server_labels",
        )
        for attack in attacks:
            assert 0 <= row[attack]["recovery"] <= 1
        assert {"loss", "exact_match"} <= set(row["utility"])
    assert off["head_server_labels"]["recovery"] == 1.0
    # head=client gives the targets away too; M = 3 leaves the server no layer at K = 1 and is skipped
    client, u_split = off["head_client_labels"]
    assert (client["client_layers"], client["recovery"], client["prompt_end_found"]) == (0, 1.0, 1.0)
    assert u_split["client_layers"] == 2 and u_split["prompt_end_found"] == 0.0
    noised = {(n["client_layers"], n["grad_noise"]): n for n in off["gradient_noise"]}
    assert set(noised) == {(0, 32.0), (2, 32.0)}
    assert noised[(0, 32.0)]["labels"]["recovery"] < client["recovery"]
    assert {"loss", "step_s"} <= set(noised[(2, 32.0)]["utility"])
    assert off["nearest_neighbour"]["recovery"] > noisy["nearest_neighbour"]["recovery"]
    assert off["privacy"] is None  # the option off: nothing to account
    assert noisy["privacy"]["epsilon"] > 0 and noisy["privacy"]["delta"] == 1e-5
    assert report["runtime"] == {"device": "cpu", "dtype": "fp32"}  # the defaults


def test_privacy_audit_refuses_an_unknown_dtype_before_loading_anything(tmp_path):
    args = ["privacy-audit", str(tmp_path / "missing"), "--data", str(tmp_path / "x.jsonl"), "--dtype", "fp8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2  # a usage error: the option's choices come from the dataclass's Literal
    assert "'fp8' is not one of 'fp32', 'bf16', 'fp16'" in result.output


def test_privacy_audit_help_lists_the_options():
    result = runner.invoke(app, ["privacy-audit", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    options = ("--data", "--split-at", "--noise", "--clip", "--client-layers", "--grad-noise", "--json")
    for option in (*options, "--device", "--dtype"):
        assert option in result.output


@pytest.mark.parametrize(
    "runtime",
    [
        pytest.param(("cpu", "bf16"), id="cpu-bf16"),
        pytest.param(("cuda", "fp32"), id="cuda-fp32", marks=ON_GPU),
        pytest.param(("cuda", "bf16"), id="cuda-bf16", marks=ON_GPU),
    ],
)
def test_the_audit_runs_on_the_runtime_device_and_dtype_and_reports_them(dirs, tmp_path, runtime):
    # Prepare: every attack and both label settings (M = 0 and the U-split), without and with noise
    device, dtype = runtime
    data = write_jsonl(tmp_path / "train.jsonl")
    held_out = write_jsonl(tmp_path / "test.jsonl", EXAMPLES[:2])
    config = AuditConfig(
        split_at=(1,),
        noise=(0.0, 1.0),
        attack_tokens=30,
        utility_steps=2,
        prefix_len=2,
        eval_examples=2,
        inversion=InversionConfig(train_tokens=500, steps=5),
        client_layers=(0, 2),
        known_prefix=True,
    )

    # Execute
    report = run_audit(dirs.emulator, data, config, held_out, RuntimeSettings(device, dtype))  # type: ignore[arg-type]

    # Assert
    assert report["runtime"] == {"device": device, "dtype": dtype}
    off, noisy = report["settings"]
    for row in report["settings"]:
        rates = [row[a]["recovery"] for a in ("nearest_neighbour", "nearest_neighbour_known_prefix")]
        rates += [row["learned_inversion"]["recovery"], row["head_server_labels"]["recovery"]]
        rates += [r["recovery"] for r in row["head_client_labels"]]
        assert all(0 <= r <= 1 for r in rates), rates
        assert 0 <= row["utility"]["exact_match"] <= 1 and row["utility"]["loss"] > 0
    assert off["head_server_labels"]["recovery"] == 1.0  # read off the request, whatever the dtype
    assert off["nearest_neighbour"]["recovery"] > noisy["nearest_neighbour"]["recovery"]
    # exact in fp32 on any device; in bf16 the attacker's candidates and Jacobians round too
    exact = [off["nearest_neighbour_known_prefix"]["recovery"], off["head_client_labels"][0]["recovery"]]
    assert all(r == 1.0 if dtype == "fp32" else r >= 0.9 for r in exact), exact


def test_nearest_neighbour_with_the_bottom_prefix_known_recovers_what_an_unknown_one_hides(tiny):
    # Prepare: a large prefix the data party trained, which shifts the layer-1 states
    model, _, bottom, encoded = tiny
    kv = random_kv(model, 3, scale=4.0)
    (observation,) = observe(bottom, encoded[:1], kv, 1, None)

    # Execute
    unknown = nearest_neighbour_attack(bottom, observation, None)
    known = nearest_neighbour_attack(bottom, observation, None, kv[:1])

    # Assert
    assert torch.equal(known, observation.token_ids)
    assert not torch.equal(unknown, observation.token_ids)
