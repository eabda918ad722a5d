"""The emulator format: a standard HF model directory plus a manifest that maps it to the full model.

The emulator keeps the tokenizer, embeddings, layers [0, K), the final norm and the LM head of the
full model bit for bit, and keeps N of the L - K upper layers. The manifest records which original
layers were kept, which kept layer stands in for each dropped one, and fingerprints that let the
model party check that a data party's bottom part is the one its model was cut from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.errors import ConfigError, ShapeMismatchError, SplitPrefixError
from splitprefix.model.loading import load_tokenizer, resolve_model_dir
from splitprefix.model.partial_load import CheckpointReader, meta_model, open_checkpoint, tensor_aliases
from splitprefix.model.split import Bottom, LayerStack, check_split_at

MANIFEST_FILE = "emulator_manifest.json"
FORMAT_VERSION = 1


class FingerprintMismatchError(SplitPrefixError, ValueError):
    """A tokenizer or bottom part does not come from the model it is used with."""


def uniform_keep(num_layers: int, split_at: int, keep: int) -> list[int]:
    """Original indices of the N upper layers kept by uniform layer drop: the middle of N equal chunks."""
    check_split_at(split_at, num_layers)
    upper = num_layers - split_at
    if not 1 <= keep < upper:
        raise ConfigError(
            f"keep must satisfy 1 <= N < L - K = {upper} (L={num_layers}, K={split_at}); got N={keep}"
        )
    return [split_at + int((i + 0.5) * upper / keep) for i in range(keep)]


def stand_ins(num_layers: int, split_at: int, kept_upper: list[int]) -> list[int]:
    """For each original layer, the emulator layer that represents it: layer l < K is emulator layer l;
    an upper layer maps to the nearest kept upper layer (the lower one on a tie), so kept layers map
    to themselves."""
    mapping = list(range(split_at))
    for layer in range(split_at, num_layers):
        nearest = min(range(len(kept_upper)), key=lambda j: (abs(kept_upper[j] - layer), kept_upper[j]))
        mapping.append(split_at + nearest)
    return mapping


@dataclass
class EmulatorManifest:
    """How an emulator relates to the full model it was built from. Saved as JSON beside it."""

    base_model: str
    """Identity of the full model: the name or path it was loaded from."""
    base_config_sha256: str
    """Hash of the full model's config, to tell models of the same name apart."""
    num_layers: int
    """Layers L of the full model."""
    split_at: int
    """K: layers [0, K) are the data party's and identical in emulator and full model."""
    kept_layers: list[int]
    """For each emulator layer, the original layer it is a copy of (K + N entries)."""
    layer_map: list[int]
    """For each original layer, the emulator layer whose prefix it takes (L entries)."""
    tokenizer_sha256: str
    """Fingerprint of the tokenizer (vocabulary and special tokens)."""
    bottom_sha256: str
    """Fingerprint of the embeddings and layers [0, K)."""
    distillation: dict[str, Any] | None = None
    """Settings and before/after metrics of distillation, if any was run."""
    client_layers: int = 0
    """M: the emulator's last M layers are the full model's layers [L - M, L) bit for bit, so a data
    party may keep them (the U-shaped split); 0 = none shipped exactly."""
    top_sha256: dict[str, str] = field(default_factory=dict)
    """For each m in 1..M (as a string), the fingerprint of the last m layers (`top_fingerprint`)."""
    format_version: int = FORMAT_VERSION
    """Version of this manifest format."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes."""

    def __post_init__(self) -> None:
        check_split_at(self.split_at, self.num_layers)
        if self.kept_layers[: self.split_at] != list(range(self.split_at)):
            raise ConfigError(
                f"kept_layers must start with 0..K-1 (K={self.split_at}); got {self.kept_layers}"
            )
        if self.client_layers and self.kept_layers[-self.client_layers :] != list(
            range(self.num_layers - self.client_layers, self.num_layers)
        ):
            raise ConfigError(
                f"client_layers={self.client_layers} needs the last kept layers to be the full model's "
                f"last {self.client_layers}; got kept_layers {self.kept_layers}"
            )
        if len(self.layer_map) != self.num_layers or any(
            not 0 <= j < len(self.kept_layers) for j in self.layer_map
        ):
            raise ConfigError(
                f"layer_map must give an emulator layer in [0, {len(self.kept_layers)}) for each of "
                f"L={self.num_layers} layers; got {self.layer_map}"
            )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> EmulatorManifest:
        """Read and validate a manifest; a missing or corrupt one raises a clear ConfigError."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; is {directory} an emulator built by `splitprefix emulate`?"
            )
        try:
            raw = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            manifest = cls(**{k: v for k, v in raw.items() if k in known})
        except (json.JSONDecodeError, TypeError, AttributeError) as error:
            raise ConfigError(
                f"{path} is corrupt ({error}); rebuild the emulator with `splitprefix emulate`"
            ) from None
        if manifest.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"{path} has format_version {manifest.format_version}; this splitprefix reads <= {FORMAT_VERSION}"
            )
        return manifest


def _sha256_tensors(names: Iterable[str], tensor: Callable[[str], torch.Tensor]) -> str:
    """Hash of the named tensors in name order, each fetched by `tensor(name)` only when hashed, so
    that no more than one of them need be in memory."""
    digest = hashlib.sha256()
    for name in sorted(names):
        data = tensor(name).detach()
        digest.update(f"{name}:{tuple(data.shape)};".encode())
        flat = data.reshape(-1)
        for start in range(0, flat.numel(), HASH_CHUNK):
            # fp32 so that loading the same weights in another dtype does not change the fingerprint;
            # a chunk at a time, so that an embedding of 256k rows is never copied whole
            chunk = flat[start : start + HASH_CHUNK].float().contiguous().cpu()
            digest.update(chunk.view(torch.uint8).numpy().data)  # a view: no copy
    return digest.hexdigest()


HASH_CHUNK = 1 << 22
"""Elements converted to fp32 at a time while hashing (16 MiB)."""


def bottom_fingerprint(model: PreTrainedModel, split_at: int) -> str:
    """Hash of the embeddings and layers [0, K): equal for a full model and its emulators."""
    tensors = Bottom(model, split_at).state_dict()
    return _sha256_tensors(tensors, tensors.__getitem__)


def top_fingerprint(model: PreTrainedModel, client_layers: int) -> str:
    """Hash of the last M layers of `model`: equal for a full model and an emulator that ships them."""
    layers = LayerStack(model, model.config.num_hidden_layers - client_layers, model.config.num_hidden_layers)
    tensors = layers.state_dict()
    return _sha256_tensors(tensors, tensors.__getitem__)


def stored_bottom_fingerprint(reader: CheckpointReader, skeleton: PreTrainedModel, split_at: int) -> str:
    """`bottom_fingerprint` of the model whose checkpoint `reader` reads, hashed tensor by tensor
    from the file (one fp32 tensor in memory at a time). `skeleton` gives the names and may be on
    the meta device."""
    views, aliases = Bottom(skeleton, split_at).state_dict(keep_vars=True), tensor_aliases(skeleton)
    return _sha256_tensors(views, lambda name: reader.read(aliases[id(views[name])]))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary and special tokens, independent of how the files are laid out."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


LOAD_TIME_CONFIG_KEYS = (
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "transformers_version",
)
"""Config fields that say how and where a model was loaded, not which model it is."""


def config_fingerprint(model: PreTrainedModel) -> str:
    """Hash of the model's config, the same whatever path, dtype or library version loaded it.

    The model party loads its top from the stored dtype (bf16 for the shipped model) while the
    emulator was built from an fp32 copy; both must agree on the fingerprint.
    """
    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in LOAD_TIME_CONFIG_KEYS:
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def verify_bottom(
    manifest: EmulatorManifest, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Raise FingerprintMismatchError unless `model`'s bottom K layers and `tokenizer` match the manifest."""
    _check_fingerprints(
        manifest, tokenizer_fingerprint(tokenizer), bottom_fingerprint(model, manifest.split_at)
    )


VERIFIED_FILE = "emulator_verified.json"
"""Written into an emulator's directory once its stored bottom has been checked: what was checked
against which file state."""

_verified: set[str] = set()
_verified_lock = threading.Lock()


def verify_emulator(directory: str | Path, manifest: EmulatorManifest) -> None:
    """Raise FingerprintMismatchError unless the bottom and the tokenizer stored in `directory`
    match `manifest`.

    The bottom is hashed from the checkpoint tensor by tensor, and only once for each state of the
    directory's files (name, size, mtime_ns and inode of each): federation opens a session every
    round, in a new process when deployed, and rehashing a bottom of several GB when no file changed
    would find nothing new. A passed check is remembered in this process and in `VERIFIED_FILE`
    (skipped where the directory is read-only). The record guards against using the wrong files by
    mistake; whoever can forge it can as well rewrite the manifest.
    """
    path = resolve_model_dir(directory).resolve()
    record = {
        "split_at": manifest.split_at,
        "bottom_sha256": manifest.bottom_sha256,
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "files": _file_state(path),
    }
    key = json.dumps({"path": str(path), **record}, sort_keys=True)
    with _verified_lock:
        if key in _verified:
            return
    if _read_record(path) != record:
        skeleton = meta_model(AutoConfig.from_pretrained(path))
        bottom = stored_bottom_fingerprint(open_checkpoint(path, skeleton), skeleton, manifest.split_at)
        _check_fingerprints(manifest, tokenizer_fingerprint(load_tokenizer(path)), bottom)
        _write_record(path, record)
    with _verified_lock:
        _verified.add(key)


def _file_state(directory: Path) -> list[list[str | int]]:
    """[name, size, mtime_ns, inode] of every file in `directory` but the record: any rewrite or
    replacement of one changes it."""
    files = [f for f in sorted(directory.iterdir()) if f.is_file() and VERIFIED_FILE not in f.name]
    return [[f.name, st.st_size, st.st_mtime_ns, st.st_ino] for f in files for st in [f.stat()]]


def _read_record(directory: Path) -> Any:
    try:
        return json.loads((directory / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_record(directory: Path, record: dict[str, Any]) -> None:
    temporary = directory / f".{VERIFIED_FILE}.{os.getpid()}.{threading.get_ident()}"
    try:
        temporary.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(temporary, directory / VERIFIED_FILE)  # atomic: parties may share an emulator
    except OSError:  # a read-only emulator: remember the check in this process only
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _check_fingerprints(manifest: EmulatorManifest, tokenizer_sha256: str, bottom_sha256: str) -> None:
    checks = (
        ("tokenizer", manifest.tokenizer_sha256, tokenizer_sha256),
        (f"bottom {manifest.split_at} layers", manifest.bottom_sha256, bottom_sha256),
    )
    for what, expected, actual in checks:
        if expected != actual:
            raise FingerprintMismatchError(
                f"the {what} differ from those the emulator was built from ({manifest.base_model}): expected "
                f"sha256 {expected[:12]}…, got {actual[:12]}…. Use the emulator built from this model."
            )


DroppedLayers = Literal["auto", "stand-in", "zeros"]


def integrate_kv(
    kv: torch.Tensor, manifest: EmulatorManifest, dropped: DroppedLayers = "auto"
) -> torch.Tensor:
    """Map an emulator-layout prefix (K + N, 2, n_kv, P, hd) onto all L layers of the full model.

    Kept layers map one to one. A dropped layer takes its stand-in's prefix (`dropped="stand-in"`)
    or zero keys and values (`"zeros"`). `"auto"` takes zeros for a distilled emulator, whose kept
    layers learnt to do the dropped ones' work, and the stand-in's otherwise: on real text that
    carried the most of the whole-model gain for each (docs: offsite transfer on real text).
    """
    emulator_layers = len(manifest.kept_layers)
    if kv.shape[0] != emulator_layers:
        raise ShapeMismatchError(
            f"the prefix has {kv.shape[0]} layers; this emulator has {emulator_layers} (was it trained on another one?)"
        )
    if dropped not in ("auto", "stand-in", "zeros"):
        raise ConfigError(f"dropped must be 'auto', 'stand-in' or 'zeros'; got {dropped!r}")
    if dropped == "auto":
        dropped = "zeros" if manifest.distillation else "stand-in"
    layers = []
    for layer, source in enumerate(manifest.layer_map):
        kept = manifest.kept_layers[source] == layer
        layers.append(kv[source] if kept or dropped == "stand-in" else torch.zeros_like(kv[source]))
    return torch.stack(layers)  # (L, 2, n_kv, P, head_dim)
