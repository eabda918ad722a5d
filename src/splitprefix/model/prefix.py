"""The deep prefix: P virtual tokens of keys and values for every decoder layer.

The prefix is one tensor `kv` of shape (L, 2, n_kv_heads, P, head_dim): index 0 of the second
axis holds keys, index 1 values. Grouped-query attention is handled by sizing it with the
key/value heads, not the attention heads. The data party owns it; the bottom layers read
`kv[:K]` and the top layers `kv[K:]`.

Layers whose cache is narrower than the tensor use its leading heads and columns: keys and values
may differ in width (DeepSeek-V3's latent attention caches a kv_lora_rank-wide latent as keys and a
qk_rope_head_dim-wide rotary key as values), and so may layers. `PrefixConfig.layers_kv` records
each layer's (heads, key width, value width); the rest of the tensor is padding that is kept at
zero and never reaches a model. One tensor keeps slicing by layer, averaging, the wire and the
files the same for every family, at the cost of the padding (PEFT provisions the widest layer and
slices the same way).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.model.registry import LayerKV, model_dims

CONFIG_FILE = "prefix_config.json"
WEIGHTS_FILE = "prefix.safetensors"


@dataclass(frozen=True)
class PrefixConfig:
    """Shape and parameterisation of a deep prefix."""

    num_layers: int
    """Decoder layers L that get a prefix."""
    num_kv_heads: int
    """Key/value heads of the prefix tensor: the most any layer caches."""
    head_dim: int
    """Head width of the prefix tensor: the widest key or value any layer caches."""
    num_virtual_tokens: int
    """Virtual tokens P per layer."""
    projection_dim: int | None = None
    """Hidden width of the MLP reparameterisation; None trains the keys/values directly."""
    init_std: float = 1.0
    """Standard deviation of the random initialisation (unit scale trained faster than 0.02 here)."""
    layers_kv: tuple[tuple[int, int, int], ...] | None = None
    """Per layer (kv heads, key width, value width) where some layer caches less than
    (num_kv_heads, head_dim, head_dim); None when every layer fills the tensor."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_virtual_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"projection_dim must be >= 1 or None; got {self.projection_dim}")
        if self.layers_kv is not None:
            # JSON gives lists; tuples keep the config comparable, and a layout without padding is None
            layers = tuple(tuple(layer) for layer in self.layers_kv)
            full = (self.num_kv_heads, self.head_dim, self.head_dim)
            object.__setattr__(self, "layers_kv", layers)
            self._check_layers_kv()
            if all(layer == full for layer in layers):
                object.__setattr__(self, "layers_kv", None)

    def _check_layers_kv(self) -> None:
        layers = self.layers_kv or ()
        bounds = (self.num_kv_heads, self.head_dim, self.head_dim)
        if len(layers) != self.num_layers or any(
            len(layer) != 3 or not all(1 <= n <= most for n, most in zip(layer, bounds, strict=True))
            for layer in layers
        ):
            raise ConfigError(
                f"layers_kv must give {self.num_layers} (kv heads, key width, value width) triples within "
                f"(1..{self.num_kv_heads}, 1..{self.head_dim}, 1..{self.head_dim}); got {layers}"
            )

    @classmethod
    def for_model(cls, config: PretrainedConfig, num_virtual_tokens: int, **kwargs: object) -> PrefixConfig:
        """A prefix config that fits every layer of a model with `config`."""
        dims = model_dims(config)
        layers = None if dims.uniform else tuple(astuple(layer) for layer in dims.layer_kv)
        return cls(
            dims.num_layers,
            dims.num_kv_heads,
            dims.head_dim,
            num_virtual_tokens,
            layers_kv=layers,
            **kwargs,  # type: ignore[arg-type]
        )

    def layer_kv(self) -> list[LayerKV]:
        """What each layer's cache holds of the prefix tensor."""
        if self.layers_kv is None:
            return [LayerKV(self.num_kv_heads, self.head_dim, self.head_dim)] * self.num_layers
        return [LayerKV(*layer) for layer in self.layers_kv]

    def padding_mask(self) -> torch.Tensor | None:
        """1 where the prefix tensor holds a real key or value, 0 on padding: (L, 2, n_kv, 1, head_dim).

        None when nothing is padded.
        """
        if self.layers_kv is None:
            return None
        return layout_mask(self.layer_kv(), self.num_kv_heads, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)

    @property
    def token_dim(self) -> int:
        """Width of one layer's key (or value) for one virtual token: n_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def check_fits(self, config: PretrainedConfig) -> None:
        """Raise ShapeMismatchError unless this prefix fits the model described by `config`."""
        dims = model_dims(config)
        expected = (dims.num_layers, dims.num_kv_heads, dims.head_dim)
        actual = (self.num_layers, self.num_kv_heads, self.head_dim)
        if expected != actual:
            raise ShapeMismatchError(
                "prefix does not fit this model: expected (layers, kv_heads, head_dim) = "
                f"{expected}, got {actual}"
            )
        if self.layer_kv() != list(dims.layer_kv):
            raise ShapeMismatchError(
                f"prefix does not fit this model: its layers hold {self.layer_kv()}, the model's {list(dims.layer_kv)}"
            )


def layout_mask(layers: list[LayerKV], num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """1 on each layer's real key and value entries, 0 on padding: (L, 2, n_kv, 1, head_dim)."""
    mask = torch.zeros(len(layers), 2, num_kv_heads, 1, head_dim)
    for i, layer in enumerate(layers):
        mask[i, 0, : layer.num_kv_heads, :, : layer.key_dim] = 1
        mask[i, 1, : layer.num_kv_heads, :, : layer.value_dim] = 1
    return mask


def rows_to_kv(rows: torch.Tensor, config: PrefixConfig) -> torch.Tensor:
    """(P, L*2*n_kv*head_dim) rows laid out [L0_K | L0_V | L1_K | ...] to kv (L, 2, n_kv, P, head_dim)."""
    c = config
    expected = (c.num_virtual_tokens, c.num_layers * 2 * c.token_dim)
    if tuple(rows.shape) != expected:
        raise ShapeMismatchError(f"prefix rows must be {expected}; got {tuple(rows.shape)}")
    kv = rows.view(c.num_virtual_tokens, c.num_layers, 2, c.num_kv_heads, c.head_dim)
    return kv.permute(1, 2, 3, 0, 4)


def kv_to_rows(kv: torch.Tensor) -> torch.Tensor:
    """The inverse of `rows_to_kv`: (L, 2, n_kv, P, head_dim) to (P, L*2*n_kv*head_dim)."""
    return kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)


class Prefix(nn.Module):
    """A trainable deep prefix. Calling it returns kv, (L, 2, n_kv_heads, P, head_dim)."""

    padding: torch.Tensor | None
    """The layout's padding mask (L, 2, n_kv, 1, head_dim), or None when nothing is padded."""

    def __init__(self, config: PrefixConfig, kv: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        mask = config.padding_mask()
        self.register_buffer("padding", mask, persistent=False)
        if config.projection_dim is None:
            init = torch.randn(config.kv_shape) * config.init_std if kv is None else kv.detach().clone()
            check_kv_shape(init, config.kv_shape, "kv")
            # padding stays zero: it never reaches a cache, so it never gets a gradient
            self.kv = nn.Parameter(init if mask is None else init * mask)
        else:
            if kv is not None:
                raise ConfigError(
                    "a reparameterised prefix cannot start from given kv; set projection_dim=None"
                )
            self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, config.token_dim))
            self.mlp = nn.Sequential(
                nn.Linear(config.token_dim, config.projection_dim),
                nn.Tanh(),
                nn.Linear(config.projection_dim, config.num_layers * 2 * config.token_dim),
            )

    def forward(self) -> torch.Tensor:
        if self.config.projection_dim is None:
            return self.kv
        kv = rows_to_kv(self.mlp(self.embedding), self.config)  # (L, 2, n_kv, P, head_dim)
        return kv if self.padding is None else kv * self.padding

    def fold(self) -> Prefix:
        """A plain prefix holding this one's current keys/values, with the MLP folded away."""
        with torch.no_grad():
            kv = self()
        return Prefix(dataclasses.replace(self.config, projection_dim=None), kv)

    def save(self, directory: str | Path) -> Path:
        """Write `prefix_config.json` and `prefix.safetensors` into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, out / WEIGHTS_FILE)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Prefix:
        """Read a prefix written by `save`. Unknown config keys are ignored with a warning."""
        src = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (src / name).is_file():
                raise FileNotFoundError(
                    f"{src / name} not found; is {src} a prefix directory written by save()?"
                )
        prefix = cls(_read_config(src / CONFIG_FILE))
        state = load_file(src / WEIGHTS_FILE)
        expected = {name: tuple(t.shape) for name, t in prefix.state_dict().items()}
        actual = {name: tuple(t.shape) for name, t in state.items()}
        if expected != actual:
            raise ShapeMismatchError(f"{src / WEIGHTS_FILE} holds {actual}; its config needs {expected}")
        prefix.load_state_dict(state)
        return prefix


def _read_config(path: Path) -> PrefixConfig:
    raw = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(PrefixConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        warnings.warn(f"{path}: ignoring unknown prefix config keys {unknown}", stacklevel=3)
    return PrefixConfig(**{k: v for k, v in raw.items() if k in known})


def check_kv_shape(kv: torch.Tensor, expected: tuple[int, ...], what: str = "prefix kv") -> None:
    """Raise ShapeMismatchError with the expected and actual shape unless they agree."""
    if tuple(kv.shape) != tuple(expected):
        raise ShapeMismatchError(
            f"{what} must have shape (layers, 2, kv_heads, P, head_dim) = {tuple(expected)}; got {tuple(kv.shape)}"
        )


def split_kv(kv: torch.Tensor, split_at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix for the bottom layers [0, K) and for the top layers [K, L)."""
    return kv[:split_at], kv[split_at:]


def prefix_cache(
    kv: torch.Tensor, config: PretrainedConfig, batch_size: int, first_layer: int = 0
) -> DynamicCache:
    """A fresh cache whose layers [first_layer, first_layer + n) hold `kv` (n, 2, n_kv, P, head_dim).

    Build a new one for every forward: layers extend the cache in place. Prefix keys carry no
    rotary embedding, and gradients reach `kv` through the cache's concatenation.
    """
    cache = DynamicCache(config=config)
    dims = model_dims(config)
    n = kv.shape[0]
    if first_layer + n > dims.num_layers:
        raise ShapeMismatchError(
            f"prefix for layers [{first_layer}, {first_layer + n}) exceeds L={dims.num_layers}"
        )
    check_kv_shape(kv, (n, 2, dims.num_kv_heads, kv.shape[3], dims.head_dim))
    for i in range(n):
        layer = dims.layer_kv[first_layer + i]
        heads = kv[i, :, : layer.num_kv_heads]  # (2, n_kv of this layer, P, head_dim)
        keys = heads[0, ..., : layer.key_dim].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, h, P, dk)
        values = heads[1, ..., : layer.value_dim].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, h, P, dv)
        cache.update(keys, values, first_layer + i)
    return cache
