"""`splitprefix privacy-audit`: for each cut K and noise level sigma, what the model party recovers
and what the data party's training still achieves.

For each setting the audit
1. trains a prefix through the split (the model party's layers run here, behind `LocalTop`) with
   the privacy option at that setting, and measures held-out loss and exact match through the same
   noised split: the utility;
2. takes the layer-K states of the first training examples exactly as they would be sent, with that
   trained prefix and fresh noise, and attacks them: nearest neighbour and learned inversion;
3. runs head=server training steps on those examples and reads the targets off the requests;
4. runs head=client training steps (and U-shaped split steps, the data party keeping the top M
   layers) and inverts the gradients sent back into the targets (`audit.gradient_labels`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.audit.gradient_labels import gradient_label_recovery
from splitprefix.audit.inversion import InversionConfig, invert, public_sequences, train_inverter
from splitprefix.audit.labels import label_recovery
from splitprefix.audit.nearest import nearest_neighbour_attack
from splitprefix.audit.observe import LocalTop, Observation, first_tokens, observe
from splitprefix.data.batching import Batch, EncodedExample, encode_examples, resolve_pad_id
from splitprefix.data.formats import Example, load_jsonl
from splitprefix.data_party.accounting import held_out_releases, privacy_report, training_releases
from splitprefix.data_party.gradient_noise import GradientNoise, GradientNoiser
from splitprefix.data_party.offsite import split_held_out
from splitprefix.data_party.privacy import HiddenPrivacy, PrivacyConfig
from splitprefix.data_party.split_forward import bottom_device, run_split, split_loss_fn
from splitprefix.data_party.train import TrainConfig, train_prefix
from splitprefix.data_party.u_split import u_split_loss_fn
from splitprefix.errors import ConfigError
from splitprefix.evaluation.evaluate import EvalConfig, Scorer, evaluate, greedy_generate
from splitprefix.model.emulator import MANIFEST_FILE, EmulatorManifest
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.model.split import Bottom, ClientTop, Head, check_split_at
from splitprefix.pretraining.corpus import python_topic_documents
from splitprefix.runtime import RuntimeSettings


@dataclass(frozen=True)
class AuditConfig:
    """What the audit measures, and how much work it spends on it."""

    split_at: tuple[int, ...] = ()
    """Cuts K to audit; empty = the emulator's K."""
    noise: tuple[float, ...] = (0.0,)
    """Noise multipliers sigma to audit; 0 = the privacy option off (unless clip_norm is set)."""
    clip_norm: float | None = None
    """C; None = the median layer-K token norm of the public text, at each K, and no clipping at sigma 0."""
    attack_tokens: int = 200
    """Tokens of the data party's training examples that the attacks try to recover."""
    utility_steps: int = 100
    """Split-training steps behind the utility figures."""
    prefix_len: int = 16
    """Virtual tokens P of the trained prefix."""
    lr: float = 0.1
    """Learning rate of the prefix."""
    batch_size: int = 16
    """Examples per training step."""
    eval_examples: int = 100
    """Held-out examples for loss and exact match."""
    max_length: int = 128
    """Tokens kept per example."""
    seed: int = 0
    """Seed of the prefix, the data order and the noise."""
    inversion: InversionConfig = field(default_factory=InversionConfig)
    """The learned-inversion attacker's training."""
    client_layers: tuple[int, ...] = (0, 1, 2)
    """Top layers M the data party keeps for the head=client label attack (0 = head=client, more = the
    U-shaped split); an M that leaves the server no layer at some K is skipped there."""
    grad_noise: tuple[float, ...] = ()
    """Gradient-noise multipliers rho (> 0) to measure as a further defence: for each M and rho, label
    recovery from the noised gradients and the utility of a prefix trained with them."""
    known_prefix: bool = False
    """Also run nearest neighbour with the data party's prefix for layers [0, K) known to the
    attacker, as the aggregator of a federation would know it."""

    def __post_init__(self) -> None:
        if any(not r > 0 for r in self.grad_noise):
            raise ConfigError(f"grad_noise multipliers must each be > 0; got {self.grad_noise}")
        if any(m < 0 for m in self.client_layers):
            raise ConfigError(f"client_layers must each be >= 0; got {self.client_layers}")
        if any(s < 0 for s in self.noise) or not self.noise:
            raise ConfigError(f"noise needs at least one value, each >= 0; got {self.noise}")
        if min(self.attack_tokens, self.utility_steps, self.prefix_len, self.eval_examples) < 1:
            raise ConfigError(
                "attack_tokens, utility_steps, prefix_len and eval_examples must be >= 1; got "
                f"{self.attack_tokens}, {self.utility_steps}, {self.prefix_len}, {self.eval_examples}"
            )


@dataclass
class _Target:
    """The audited model and the data party's examples."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_model: str
    train: list[EncodedExample]
    held_out: list[Example]
    public: list[str]


def run_audit(
    emulator_dir: Path,
    data: Path,
    config: AuditConfig,
    eval_data: Path | None = None,
    runtime: RuntimeSettings = RuntimeSettings(),
) -> dict[str, Any]:
    """Audit every (K, sigma) of `config` on the data party's `data`, the model on `runtime`'s device
    and dtype (the prefixes and the inversion attacker learn in fp32); returns the JSON report."""
    target, default_k = _load(emulator_dir, data, config, eval_data, runtime)
    rows = [
        _audit_setting(target, k, sigma, config)
        for k in (config.split_at or (default_k,))
        for sigma in config.noise
    ]
    return {
        "base_model": target.base_model,
        "data": str(data),
        "n_train": len(target.train),
        "n_held_out": len(target.held_out),
        "config": asdict(config),
        "runtime": asdict(runtime),
        "attacker": ATTACKER,
        "settings": rows,
    }


ATTACKER = (
    "The model party owns the full model and sees every wire tensor: the layer-K states, the mask, "
    "the positions, its own layers' prefix and, with head=server, the target tokens; with head=client, the "
    "gradient of the states it returned, and it owns the final norm and head (and, under the U-shaped split, "
    "the weights of the top M layers the data party keeps). It does not know the data party's prefix for "
    "layers [0, K) or for the top M layers, nor the noise seed; it knows C and sigma."
)


def _load(
    emulator_dir: Path, data: Path, config: AuditConfig, eval_data: Path | None, runtime: RuntimeSettings
) -> tuple[_Target, int]:
    if (Path(emulator_dir) / MANIFEST_FILE).is_file():
        manifest = EmulatorManifest.load(emulator_dir)
        base, default_k = manifest.base_model, manifest.split_at
    elif not config.split_at:
        raise ConfigError(
            f"{emulator_dir} is no emulator (no {MANIFEST_FILE}): give the cuts with --split-at"
        )
    else:
        base, default_k = str(emulator_dir), config.split_at[0]
    model = load_causal_lm(base, runtime.torch_dtype, device=runtime.device)
    tokenizer = load_tokenizer(emulator_dir)
    train, held_out = split_held_out(load_jsonl(data), 0.1, eval_data)
    if not held_out:
        raise ConfigError(f"{data} holds too few examples to keep 10% back; give --eval-data")
    encoded = encode_examples(tokenizer, train, config.max_length)
    target = _Target(
        model, tokenizer, base, encoded, held_out[: config.eval_examples], python_topic_documents()
    )
    return target, default_k


def _privacy(target: _Target, bottom: Bottom, sigma: float, config: AuditConfig) -> PrivacyConfig:
    if sigma == 0 and config.clip_norm is None:
        return PrivacyConfig(seed=config.seed)  # off
    clip = config.clip_norm or _median_norm(target, bottom, config)
    return PrivacyConfig(clip_norm=clip, noise_multiplier=sigma, seed=config.seed)


@torch.no_grad()
def _median_norm(target: _Target, bottom: Bottom, config: AuditConfig) -> float:
    """Median L2 norm of layer-K token states of a slice of public text."""
    sample = InversionConfig(train_tokens=2_000, seq_len=config.inversion.seq_len)
    ids = public_sequences(target.tokenizer, target.public, sample).to(bottom_device(bottom))
    mask = torch.ones_like(ids)
    states = bottom(ids, mask, mask.cumsum(1) - 1).hidden
    return round(float(states.float().norm(dim=-1).median()), 2)


def _audit_setting(target: _Target, k: int, sigma: float, config: AuditConfig) -> dict[str, Any]:
    check_split_at(k, target.model.config.num_hidden_layers)
    began = time.perf_counter()
    bottom = Bottom(target.model, k)
    privacy = _privacy(target, bottom, sigma, config)
    kv, utility = _utility(target, bottom, k, privacy, config)
    wire = (
        HiddenPrivacy(PrivacyConfig(privacy.clip_norm, sigma, config.seed + 2)) if privacy.enabled else None
    )
    attacked = first_tokens(observe(bottom, target.train[:50], kv, k, wire), config.attack_tokens)
    inverter = train_inverter(
        bottom, target.tokenizer, target.public, config.prefix_len, privacy, config.inversion
    )
    nearest = _rate(attacked, lambda o: nearest_neighbour_attack(bottom, o, privacy.clip_norm))
    learned = _rate(attacked, lambda o: invert(inverter, o.hidden))
    known = {}
    if config.known_prefix:
        attack = partial(nearest_neighbour_attack, bottom, clip_norm=privacy.clip_norm, bottom_kv=kv[:k])
        known["nearest_neighbour_known_prefix"] = _rate(attacked, attack)
    pad_id = resolve_pad_id(target.tokenizer)
    labels = label_recovery(target.model, bottom, target.train[:32], kv, k, pad_id, _session(privacy))
    num_layers = target.model.config.num_hidden_layers
    client_labels = [
        gradient_label_recovery(target.model, bottom, target.train[:32], kv, k, pad_id, m, _session(privacy))
        for m in config.client_layers
        if k < num_layers - m
    ]
    return {
        "split_at": k,
        "noise_multiplier": sigma,
        "clip_norm": privacy.clip_norm,
        "nearest_neighbour": nearest,
        "learned_inversion": learned,
        **known,
        "head_server_labels": labels,
        "head_client_labels": client_labels,
        "gradient_noise": [
            _noised(target, bottom, k, m, rho, config) for m, rho in _noise_grid(k, num_layers, config)
        ],
        "utility": utility,
        "privacy": _spent(target, privacy, config),
        "wall_s": round(time.perf_counter() - began, 1),
    }


def _noise_grid(k: int, num_layers: int, config: AuditConfig) -> list[tuple[int, float]]:
    return [(m, rho) for m in config.client_layers if k < num_layers - m for rho in config.grad_noise]


def _victim_prefix(model: PreTrainedModel, config: AuditConfig) -> tuple[Prefix, TrainConfig]:
    """The data party's seeded starting prefix and its training settings, the same in every setting."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        prefix = Prefix(PrefixConfig.for_model(model.config, config.prefix_len))
    train = TrainConfig(
        steps=config.utility_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        checkpoint_every=0,
    )
    return prefix, train


def _noised(
    target: _Target, bottom: Bottom, k: int, m: int, rho: float, config: AuditConfig
) -> dict[str, Any]:
    """Train a prefix through the U-split (M = m) with noised gradients; its utility and what its
    final prefix's noised gradients give away (the privacy option on the states is off here)."""
    model, top = target.model, LocalTop(target.model, k, "client", m)
    prefix, train = _victim_prefix(model, config)
    noiser = GradientNoiser(GradientNoise(rho))
    loss_fn = u_split_loss_fn(bottom, top, ClientTop(model, m), k, None, noiser)
    pad_id = resolve_pad_id(target.tokenizer)
    began = time.perf_counter()
    history = train_prefix(prefix, loss_fn, target.train, pad_id, train, desc=f"K={k} M={m} rho={rho}")
    step_s = (time.perf_counter() - began) / config.utility_steps
    kv = prefix().detach()
    head_top = LocalTop(model, k, "client")
    scorer = _scorer(bottom, head_top, Head(model), k, None, target.tokenizer)
    report = evaluate(scorer, target.tokenizer, target.held_out, kv, EvalConfig(max_length=config.max_length))
    labels = gradient_label_recovery(
        model, bottom, target.train[:32], kv, k, pad_id, m, None, GradientNoise(rho)
    )
    utility = {key: report[key] for key in ("loss", "exact_match") if key in report}
    return {
        "client_layers": m,
        "grad_noise": rho,
        "labels": labels,
        "utility": utility | {"final_train_loss": history.losses[-1], "step_s": round(step_s, 4)},
    }


def _spent(target: _Target, privacy: PrivacyConfig, config: AuditConfig) -> dict[str, Any] | None:
    """(epsilon, delta) of the utility run's releases: its training steps and its held-out evaluation.

    Each attack looks at one release of an example; a real attacker sees all of them."""
    lengths = [len(e) for e in target.train]
    releases = {
        "train": training_releases(lengths, config.batch_size, config.utility_steps),
        "held_out": held_out_releases(
            target.tokenizer, target.held_out, EvalConfig(max_length=config.max_length), 1
        ),
    }
    return privacy_report(privacy, releases)


def _session(privacy: PrivacyConfig) -> HiddenPrivacy | None:
    return HiddenPrivacy(privacy) if privacy.enabled else None


def _rate(observations: list[Observation], attack: Any) -> dict[str, float | int]:
    """Fraction of tokens the attack recovers exactly, over every observed position."""
    hits = sum(int((attack(o).cpu() == o.token_ids).sum()) for o in observations)  # the truth is on the CPU
    total = sum(len(o.token_ids) for o in observations)
    return {"recovery": hits / total, "n_tokens": total}


def _utility(
    target: _Target, bottom: Bottom, k: int, privacy: PrivacyConfig, config: AuditConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train a prefix through the privatised split; its kv and held-out loss and exact match."""
    model, top, head = target.model, LocalTop(target.model, k, "client"), Head(target.model)
    prefix, train = _victim_prefix(model, config)
    session = _session(privacy)
    loss_fn = split_loss_fn(bottom, top, head, k, session)
    history = train_prefix(
        prefix, loss_fn, target.train, resolve_pad_id(target.tokenizer), train, desc=f"K={k}"
    )
    kv = prefix().detach()
    eval_config = EvalConfig(max_length=config.max_length)
    report = evaluate(
        _scorer(bottom, top, head, k, session, target.tokenizer),
        target.tokenizer,
        target.held_out,
        kv,
        eval_config,
    )
    utility = {key: report[key] for key in ("loss", "exact_match") if key in report}
    return kv, utility | {"final_train_loss": history.losses[-1], "steps": config.utility_steps}


def _scorer(
    bottom: Bottom, top: LocalTop, head: Head, k: int, privacy: HiddenPrivacy | None, tokenizer: Any
) -> Scorer:
    """The privatised split for evaluation: its loss, and greedy generation by full reruns (the
    audit's local stand-in for the server keeps no generation cache)."""
    loss = split_loss_fn(bottom, top, head, k, privacy)
    eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None
    pad_id = resolve_pad_id(tokenizer)

    def logits(ids: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return head(run_split(bottom, top, ids, mask, kv, k, privacy))  # (B, T, V)

    def trained(kv: torch.Tensor | None) -> torch.Tensor:
        if kv is None:
            raise ConfigError("the audit evaluates a trained prefix")
        return kv

    def loss_sum(batch: Batch, kv: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        return loss(batch, trained(kv))

    def generate(ids: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None, new: int) -> torch.Tensor:
        return greedy_generate(logits, ids, mask, trained(kv), new, pad_id, eos)

    return Scorer(loss_sum, generate)
