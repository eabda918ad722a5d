"""The data party's split session: its emulator parts and the link to the server.

The data party runs the emulator's bottom K layers, which are the full model's bit for bit, with the
bottom slice of its prefix; the server runs the upper layers with the rest of the prefix, which
travels with every request. Training (`split_train`), evaluation and generation (`generate`), the
federation's parties and the privacy audit all build on `SplitSession`; the forward and loss it
runs are in `split_forward`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from splitprefix.data_party.gradient_noise import GradientNoiser
from splitprefix.data_party.parts import load_client_parts
from splitprefix.data_party.privacy import HiddenPrivacy, PrivacyConfig
from splitprefix.data_party.remote import ClientSettings, SplitClient
from splitprefix.data_party.remote_top import RemoteTop
from splitprefix.data_party.split_forward import split_loss_fn
from splitprefix.data_party.train import LossFn
from splitprefix.data_party.u_split import u_split_loss_fn
from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.model.emulator import EmulatorManifest, verify_emulator
from splitprefix.model.loading import load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.model.split import Bottom, ClientTop, Head
from splitprefix.runtime import RuntimeSettings
from splitprefix.wire.disclosure import HEAD_DISCLOSURE
from splitprefix.wire.schemas import ModelInfo

logger = logging.getLogger(__name__)


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
            top, noise = self.client_top, self.grad_noise
            return u_split_loss_fn(self.bottom, self.remote_top, top, self.split_at, self.privacy, noise)
        return split_loss_fn(self.bottom, self.remote_top, self.head, self.split_at, self.privacy)

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
