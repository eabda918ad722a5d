"""Interchange with PEFT's prefix-tuning adapters (`adapter_config.json` + `adapter_model.safetensors`).

PEFT stores a prefix as one matrix `prompt_embeddings` of shape (P, L*2*n_kv*head_dim) whose rows
are laid out [L0_K | L0_V | L1_K | ...]. Exported adapters are always folded (no projection MLP),
so any PEFT version can load them without the encoder weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import PrefixTuningConfig
from safetensors.torch import load_file, save_file

from splitprefix.errors import ConfigError, ShapeMismatchError
from splitprefix.model.prefix import Prefix, PrefixConfig, kv_to_rows, rows_to_kv

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"


def peft_unsupported(config: PrefixConfig) -> str | None:
    """Why PEFT's prefix tuning cannot hold a prefix of this layout, or None when it can.

    PEFT sizes keys and values alike (token_dim / heads), so a layer whose cached keys and values
    differ in width, as under DeepSeek-V3's latent attention, has no PEFT form.
    """
    for i, layer in enumerate(config.layer_kv()):
        if layer.key_dim != layer.value_dim:
            return (
                f"PEFT gives keys and values one width, but layer {i} caches keys {layer.key_dim} "
                f"and values {layer.value_dim} wide"
            )
    return None


def export_peft(prefix: Prefix, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `prefix` as a PEFT prefix-tuning adapter that `PeftModel.from_pretrained` loads."""
    reason = peft_unsupported(prefix.config)
    if reason is not None:
        raise ConfigError(f"this prefix cannot be exported as a PEFT adapter: {reason}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plain = prefix.fold()
    c = plain.config
    PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=c.num_virtual_tokens,
        num_layers=c.num_layers,
        token_dim=c.token_dim,
        num_attention_heads=c.num_kv_heads,
        encoder_hidden_size=c.token_dim,
        prefix_projection=False,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
    ).save_pretrained(str(out))
    save_file({PEFT_KEY: kv_to_rows(plain()).detach().contiguous().cpu()}, out / ADAPTER_WEIGHTS)
    return out


def import_peft(directory: str | Path) -> Prefix:
    """Read a PEFT prefix-tuning adapter directory back into a plain `Prefix`."""
    src = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found; is {src} a PEFT adapter directory?")
    raw = json.loads((src / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "PREFIX_TUNING":
        raise ConfigError(
            f"{src / ADAPTER_CONFIG}: expected peft_type 'PREFIX_TUNING'; got {raw.get('peft_type')!r}"
        )
    heads, token_dim = raw["num_attention_heads"], raw["token_dim"]
    if token_dim % heads:
        raise ShapeMismatchError(
            f"{src / ADAPTER_CONFIG}: token_dim {token_dim} is not a multiple of {heads} heads"
        )
    config = PrefixConfig(
        num_layers=raw["num_layers"],
        num_kv_heads=heads,
        head_dim=token_dim // heads,
        num_virtual_tokens=raw["num_virtual_tokens"],
    )
    weights = load_file(src / ADAPTER_WEIGHTS)
    if PEFT_KEY not in weights:
        raise ShapeMismatchError(
            f"{src / ADAPTER_WEIGHTS} has no {PEFT_KEY!r} tensor; found {sorted(weights)}"
        )
    # PEFT saves the projected rows even for adapters trained with prefix_projection, so these are plain kv.
    return Prefix(config, rows_to_kv(weights[PEFT_KEY].float(), config))
