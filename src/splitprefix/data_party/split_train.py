"""Prefix training and evaluation through the split model: bottom and head here, layers [K, L) remote.

The data party runs the emulator's bottom K layers, which are the full model's bit for bit, with the
bottom slice of its prefix; the server runs the upper layers with the rest of the prefix, which
travels with every request. The prefix always covers all L layers of the full model, so the result
plugs into the whole model (`splitprefix eval MODEL_DIR --prefix`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from splitprefix.data.batching import IGNORE_INDEX, Batch, encode_examples, resolve_pad_id
from splitprefix.data.formats import load_jsonl
from splitprefix.data_party.accounting import run_privacy
from splitprefix.data_party.gradient_noise import GradientNoise, GradientNoiser
from splitprefix.data_party.offsite import split_held_out, steps_for
from splitprefix.data_party.parts import load_client_parts
from splitprefix.data_party.privacy import HiddenPrivacy, PrivacyConfig
from splitprefix.data_party.remote import ClientSettings, SplitClient
from splitprefix.data_party.remote_top import RemoteTop
from splitprefix.data_party.sampling import GenerationConfig
from splitprefix.data_party.train import LossFn, StepHooks, TrainConfig, train_prefix
from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.evaluation.evaluate import EvalConfig, Scorer, evaluate
from splitprefix.evaluation.metrics import next_token_targets, supervised_loss_sum
from splitprefix.files import write_json
from splitprefix.model.emulator import EmulatorManifest, verify_emulator
from splitprefix.model.loading import load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig, prefix_cache
from splitprefix.model.split import Activations, Bottom, ClientTop, Head, extend_mask, token_positions
from splitprefix.runtime import RuntimeSettings
from splitprefix.wire.disclosure import HEAD_DISCLOSURE
from splitprefix.wire.schemas import HeadMode, ModelInfo

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "train_config.json"
EVAL_FILE = "eval.json"
DEFAULT_PREFIX_LEN = 16


class TopPart(Protocol):
    """The model party's layers [K, L) as the data party calls them: `RemoteTop`, or a local stand-in."""

    @property
    def head(self) -> HeadMode: ...

    def __call__(self, x: Activations, top_kv: torch.Tensor) -> torch.Tensor:
        """head=client: the last hidden states (B, T, d)."""
        ...

    def loss(self, x: Activations, top_kv: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """head=server: the summed cross-entropy () of `targets` (B, T), -100 where there is none."""
        ...


def run_split(
    bottom: Bottom,
    remote_top: TopPart,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    kv: torch.Tensor,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
) -> torch.Tensor:
    """head=client: the bottom with `kv[:K]` here, then the server's layers with `kv[K:]`; returns
    the last hidden states (B, T, d)."""
    x = wire_activations(bottom, input_ids, token_mask, kv, split_at, privacy)
    return remote_top(x, kv[split_at:])


def wire_activations(
    bottom: Bottom,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    kv: torch.Tensor,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
) -> Activations:
    """The layer-K activations exactly as they are sent to the model party: hidden (B, T, d),
    the mask over prefix and tokens (B, P + T), and the positions (B, T).

    `kv` is (L, 2, n_kv, P, hd) and may have P = 0 (no prefix); its bottom K layers are used here.
    `privacy` clips and noises the layer-K states before they leave.
    """
    p = kv.shape[3]
    device = bottom_device(bottom)
    token_mask = token_mask.to(device)
    mask, positions = extend_mask(token_mask, p), token_positions(token_mask, p)
    bottom_kv = kv[:split_at].to(device, bottom_dtype(bottom))  # a differentiable cast: grads reach kv
    cache = prefix_cache(bottom_kv, bottom.stack.config, input_ids.shape[0]) if p else None
    x = bottom(input_ids.to(device), mask, positions, cache)  # hidden (B, T, d) at layer K
    if privacy is not None:
        x.hidden = privacy(x.hidden, token_mask)
    return x


def bottom_device(bottom: Bottom) -> torch.device:
    return next(bottom.parameters()).device


def bottom_dtype(bottom: Bottom) -> torch.dtype:
    return next(bottom.parameters()).dtype


def split_loss_fn(
    bottom: Bottom,
    remote_top: TopPart,
    head: Head | None,
    split_at: int,
    privacy: HiddenPrivacy | None = None,
) -> LossFn:
    """A `LossFn` for `train_prefix` through the split; equals `token_loss_sum` of the whole model
    when `privacy` is None.

    head=client applies the data party's `head` to the returned hidden states; head=server sends
    the targets, and the server returns the summed loss and its gradients.
    """
    if remote_top.head == "client" and head is None:
        raise ConfigError("head=client needs the data party's Head (the emulator's final norm and LM head)")

    def loss_fn(batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        targets = next_token_targets(batch.labels)  # (B, T)
        count = int((targets != IGNORE_INDEX).sum())
        if not count:  # nothing to learn from: skip the round trip
            return kv.sum() * 0.0, 0
        x = wire_activations(bottom, batch.input_ids, batch.attention_mask, kv, split_at, privacy)
        top_kv = kv[split_at:]  # (L - K, 2, n_kv, P, hd)
        if head is None or remote_top.head == "server":
            return remote_top.loss(x, top_kv, targets), count
        return supervised_loss_sum(head, remote_top(x, top_kv), batch.labels)  # hidden (B, T, d)

    return loss_fn


@dataclass
class SplitSession:
    """Everything the data party needs to run the split model: its emulator parts and the server link."""

    manifest: EmulatorManifest
    """How the emulator relates to the server's full model."""
    tokenizer: PreTrainedTokenizerBase
    """The full model's tokenizer, shipped with the emulator."""
    client: SplitClient
    """The link to the server, already checked compatible with `manifest`."""
    info: ModelInfo
    """The server's model info."""
    bottom: Bottom
    """Embeddings and layers [0, K): the full model's, bit for bit."""
    head: Head | None
    """Final norm and LM head, with head=client; None when the server applies them."""
    remote_top: RemoteTop
    """Layers [K, L) on the server."""
    privacy: HiddenPrivacy | None = None
    """Clipping and noise on the layer-K states before they leave; None sends them as computed."""
    client_top: ClientTop | None = None
    """With head=client, layers [L - M, L) (the U-shaped split; none when M = 0), norm and head."""
    grad_noise: GradientNoiser | None = None
    """Noise on the gradient sent back with head=client (`gradient_noise`); None = off."""

    @property
    def client_layers(self) -> int:
        """M: the top layers kept here (0: the server runs [K, L))."""
        return 0 if self.client_top is None else self.client_top.client_layers

    @property
    def split_at(self) -> int:
        return self.manifest.split_at

    def prefix_config(self, num_virtual_tokens: int) -> PrefixConfig:
        """A prefix over all L layers of the server's model."""
        layout = self.info.prefix
        layers_kv = None if layout.layers_kv is None else tuple((h, k, v) for h, k, v in layout.layers_kv)
        return PrefixConfig(
            self.info.num_layers,
            layout.num_kv_heads,
            layout.head_dim,
            num_virtual_tokens,
            layers_kv=layers_kv,
        )

    def check_prefix(self, prefix: Prefix, where: str = "the prefix") -> None:
        """Raise ShapeMismatchError unless `prefix` covers every layer of the server's model."""
        c, layout = prefix.config, self.info.prefix
        expected = (self.info.num_layers, layout.num_kv_heads, layout.head_dim)
        actual = (c.num_layers, c.num_kv_heads, c.head_dim)
        if expected != actual:
            hint = ""
            if c.num_layers == len(self.manifest.kept_layers):
                hint = " It has the emulator's layout: map it with `splitprefix integrate` first."
            raise ShapeMismatchError(
                f"{where} must cover the full model: expected (layers, kv_heads, head_dim) = {expected}, "
                f"got {actual}.{hint}"
            )

    def empty_kv(self) -> torch.Tensor:
        """A prefix with P = 0: the base model."""
        return torch.zeros(self.prefix_config(1).kv_shape)[:, :, :, :0]

    def loss_fn(self) -> LossFn:
        if self.client_top is not None and (self.client_layers or self.grad_noise is not None):
            from splitprefix.data_party.u_split import u_split_loss_fn  # the U-split builds on this module

            top, noise = self.client_top, self.grad_noise
            return u_split_loss_fn(self.bottom, self.remote_top, top, self.split_at, self.privacy, noise)
        return split_loss_fn(self.bottom, self.remote_top, self.head, self.split_at, self.privacy)

    def scorer(self) -> Scorer:
        """The split model for evaluation: batched loss through the server (head=server sends the
        targets; nothing of size V crosses the wire), and the KV-cached split generation."""
        from splitprefix.data_party.generate import SplitModel  # generate builds on this module

        loss = self.loss_fn()

        @torch.no_grad()
        def loss_sum(batch: Batch, kv: torch.Tensor | None) -> tuple[torch.Tensor, int]:
            return loss(batch, self.empty_kv() if kv is None else kv)

        @torch.no_grad()
        def generate(
            ids: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None, new: int
        ) -> torch.Tensor:
            return SplitModel(self, kv).generate_ids(ids, mask, GenerationConfig(max_new_tokens=new))

        return Scorer(loss_sum, generate)

    def close(self) -> None:
        self.client.close()


def open_split(
    emulator_dir: str | Path,
    settings: ClientSettings,
    privacy: PrivacyConfig | None = None,
    runtime: RuntimeSettings = RuntimeSettings(),
) -> SplitSession:
    """Load the emulator's bottom (and head, for head=client) on `runtime`'s device and dtype, and
    connect to a compatible server.

    Only those tensors are read from the emulator's file; the kept upper layers are not. With
    `privacy` enabled, every forward clips and noises the layer-K states before they leave.
    """
    manifest = EmulatorManifest.load(emulator_dir)
    tokenizer = load_tokenizer(emulator_dir)
    verify_emulator(emulator_dir, manifest)  # hashed once per state of its files
    if settings.client_layers > manifest.client_layers:
        raise ConfigError(
            f"client_layers={settings.client_layers}: the emulator {emulator_dir} ships the full model's last "
            f"{manifest.client_layers} layers exactly; ask the model party for one built with "
            f"`emulate --client-layers {settings.client_layers}`"
        )
    parts = load_client_parts(
        emulator_dir,
        manifest.split_at,
        settings.head,
        dtype=runtime.torch_dtype,
        device=runtime.device,
        client_layers=settings.client_layers,
    )
    logger.warning(HEAD_DISCLOSURE[settings.head])  # what this session's head mode reveals
    client = SplitClient(settings)
    try:
        info = client.check_compatible(manifest)
    except BaseException:
        client.close()
        raise
    return SplitSession(
        manifest=manifest,
        tokenizer=tokenizer,
        client=client,
        info=info,
        bottom=parts.bottom,
        head=parts.head,
        remote_top=RemoteTop(client),
        privacy=HiddenPrivacy(privacy) if privacy is not None and privacy.enabled else None,
        client_top=parts.client_top,
    )


@dataclass(frozen=True)
class SplitTrainConfig:
    """Everything that defines a split training run; saved next to the prefix."""

    prefix_len: int | None = None
    """Virtual tokens P per layer; None = the --init prefix's, else 16."""
    init: Path | None = None
    """Full-layout prefix to start from (e.g. from `splitprefix integrate`); None = random."""
    max_length: int = 128
    """Tokens kept per training example."""
    epochs: float | None = None
    """Passes over the data; when set, overrides `train.steps`."""
    eval_fraction: float = 0.1
    """Share of the training file held out for evaluation when no eval_data is given."""
    eval_data: Path | None = None
    """Held-out JSONL file."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings."""
    privacy: PrivacyConfig | None = None
    """Clipping and noise on the layer-K states sent to the server; None = off."""
    exact_match: bool = True
    """Score exact match on the held-out prompts at the end (batched, KV-cached split generation)."""
    grad_noise: float = 0.0
    """rho (head=client): noise of rho x each row's RMS gradient norm on the gradient sent back,
    against the label inversion (`gradient_noise`); 0 = off."""

    def __post_init__(self) -> None:
        if self.prefix_len is not None and self.prefix_len < 1:
            raise ConfigError(f"prefix_len must be >= 1; got {self.prefix_len}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0; got {self.epochs}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2; got {self.max_length}")


def initial_prefix(session: SplitSession, config: SplitTrainConfig) -> Prefix:
    """The --init prefix (checked against the server's model), or a seeded random one."""
    if config.init is None:
        with torch.random.fork_rng():  # reproducible without touching the caller's RNG
            torch.manual_seed(config.train.seed)
            return Prefix(session.prefix_config(config.prefix_len or DEFAULT_PREFIX_LEN))
    prefix = Prefix.load(config.init).fold()
    session.check_prefix(prefix, f"the --init prefix {config.init}")
    p = prefix.config.num_virtual_tokens
    if config.prefix_len is not None and config.prefix_len != p:
        raise ConfigError(
            f"prefix_len {config.prefix_len} conflicts with the --init prefix's {p} virtual tokens"
        )
    return prefix


class _Meter:
    """Per-step traffic for the metrics log, with evaluation traffic kept apart from training's."""

    def __init__(self, session: SplitSession, held_out: list, max_length: int) -> None:
        self.session, self.held_out = session, held_out
        self.eval_config = EvalConfig(max_length=max_length, exact_match=False)
        self.last = session.client.traffic.snapshot()
        self.eval_report: dict[str, Any] = {}

    def evaluate(self, prefix: Prefix) -> dict[str, Any]:
        if not self.held_out:
            return {}
        before = self.session.client.traffic.snapshot()
        s = self.session
        report = evaluate(s.scorer(), s.tokenizer, self.held_out, prefix().detach(), self.eval_config)
        after = s.client.traffic.snapshot()
        self.eval_report = {"eval_loss": report["loss"]}
        self.last = {k: self.last[k] + after[k] - before[k] for k in after}  # not the step's traffic
        return report

    def metrics(self) -> dict[str, Any]:
        now = self.session.client.traffic.snapshot()
        line = {k: now[k] - self.last[k] for k in ("bytes_sent", "bytes_received", "retries", "recomputes")}
        self.last, report, self.eval_report = now, self.eval_report, {}
        return line | report


def train_split(
    emulator_dir: Path,
    settings: ClientSettings,
    data: Path,
    out: Path,
    config: SplitTrainConfig,
    runtime: RuntimeSettings = RuntimeSettings(),
) -> dict[str, Any]:
    """Train a full-layout prefix through the server; write it, its settings and its evaluation to `out`.

    Rerunning an interrupted job with the same `out` resumes from its last checkpoint.
    """
    session = open_split(emulator_dir, settings, config.privacy, runtime)
    if config.grad_noise:
        if settings.head != "client":
            session.close()
            raise ConfigError("grad_noise noises the gradient head=client sends back: use head=client")
        session.grad_noise = GradientNoiser(GradientNoise(config.grad_noise))
    try:
        return _train(session, emulator_dir, settings, data, out, config, runtime)
    finally:
        session.close()


def _train(
    session: SplitSession,
    emulator_dir: Path,
    settings: ClientSettings,
    data: Path,
    out: Path,
    config: SplitTrainConfig,
    runtime: RuntimeSettings,
) -> dict[str, Any]:
    train, held_out = split_held_out(load_jsonl(data), config.eval_fraction, config.eval_data)
    train_config = steps_for(config.train, config.epochs, len(train))
    prefix = initial_prefix(session, config)
    encoded = encode_examples(session.tokenizer, train, config.max_length)
    if not (out / CHECKPOINT_DIR).exists():
        (out / METRICS_FILE).unlink(missing_ok=True)  # a fresh run: drop the log of an older one
    meter = _Meter(session, held_out, config.max_length)
    hooks = StepHooks(
        evaluate=meter.evaluate if held_out else None, metrics=meter.metrics, metrics_log=out / METRICS_FILE
    )
    start = time.perf_counter()
    history = train_prefix(
        prefix,
        session.loss_fn(),
        encoded,
        resolve_pad_id(session.tokenizer),
        train_config,
        out / CHECKPOINT_DIR,
        f"split ({settings.head} head)",
        hooks,
    )
    report: dict[str, Any] = {
        "n_train": len(train),
        "steps": train_config.steps,
        "wall_s": round(time.perf_counter() - start, 1),
        "final_train_loss": history.losses[-1],
        "evals": [{k: v for k, v in e.items() if k != "samples"} for e in history.evals],
        "traffic": session.client.traffic.snapshot(),
    }
    if held_out:
        eval_config = EvalConfig(max_length=config.max_length, exact_match=config.exact_match)
        began = time.perf_counter()
        report["held_out"] = evaluate(
            session.scorer(), session.tokenizer, held_out, prefix().detach(), eval_config
        )
        report["held_out"]["wall_s"] = round(time.perf_counter() - began, 2)
    spent = run_privacy(session.tokenizer, encoded, held_out, config, train_config, len(history.evals))
    if spent is not None:
        report["privacy"] = spent
        logger.info("privacy of the states sent: epsilon %s at delta %s", spent["epsilon"], spent["delta"])
    prefix.save(out)
    record = _run_record(session, emulator_dir, settings, data, config, train_config)
    write_json(out / RUN_FILE, record | {"runtime": asdict(runtime)} | ({"privacy": spent} if spent else {}))
    write_json(out / EVAL_FILE, report)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return report


def _run_record(
    session: SplitSession,
    emulator_dir: Path,
    settings: ClientSettings,
    data: Path,
    config: SplitTrainConfig,
    train_config: TrainConfig,
) -> dict[str, Any]:
    client = {k: v for k, v in asdict(settings).items() if k != "token"}  # never write the secret
    return {
        "layout": "full",
        "base_model": session.manifest.base_model,
        "emulator": str(emulator_dir),
        "split_at": session.split_at,
        "num_layers": session.info.num_layers,
        "data": str(data),
        "client": client,
        "config": asdict(config),
        "effective_steps": train_config.steps,
    }
