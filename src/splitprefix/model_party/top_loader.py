"""Loading only the model party's part of a model: layers [K, L), the final norm and the LM head.

The model is built on the meta device (no memory), and only the parameters the top runs are read
from the safetensors file(s). The bottom (embeddings and layers [0, K)) is read once at startup to
compute its fingerprint and dropped before the top is read, so the server never holds the whole model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.errors import ConfigError
from splitprefix.model.emulator import bottom_fingerprint, config_fingerprint, tokenizer_fingerprint
from splitprefix.model.loading import load_tokenizer, resolve_model_dir
from splitprefix.model.registry import architecture_of
from splitprefix.model.split import Bottom, Head, LayerStack, check_split_at

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadedTop:
    """The server's part of a model and the fingerprints of the whole."""

    model: PreTrainedModel
    """The model skeleton: only layers [K, L), the final norm and the head hold real weights."""
    stack: LayerStack
    """Layers [K, L)."""
    head: Head
    """Final norm and LM head."""
    tokenizer: PreTrainedTokenizerBase
    base_config_sha256: str
    tokenizer_sha256: str
    bottom_sha256: str


class CheckpointReader:
    """Reads single tensors by name from a model directory's safetensors file or shards."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        if (directory / INDEX_FILE).is_file():
            weight_map: dict[str, str] = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            raise ConfigError(
                f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}; the server reads only safetensors "
                "checkpoints (re-save the model with save_pretrained)"
            )
        self._weight_map = weight_map
        self._handles = {
            name: stack.enter_context(safe_open(directory / name, "pt")) for name in set(weight_map.values())
        }

    def holds(self, names: list[str]) -> bool:
        """Whether the checkpoint has a tensor under one of `names`."""
        return any(c in self._weight_map for name in names for c in (name, name.split(".", 1)[-1]))

    def read(self, names: list[str]) -> torch.Tensor:
        """The first of `names` (aliases of one tied parameter) that the checkpoint holds."""
        for name in names:
            for candidate in (name, name.split(".", 1)[-1]):  # old checkpoints omit the backbone prefix
                if candidate in self._weight_map:
                    return self._handles[self._weight_map[candidate]].get_tensor(candidate)
        raise ConfigError(f"the checkpoint holds no tensor named {' or '.join(names)}; is it complete?")


def load_top(
    model_dir: str | Path, split_at: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedTop:
    """Layers [K, L), norm and head of the model in `model_dir`, plus the whole model's fingerprints."""
    path = resolve_model_dir(model_dir)
    config = AutoConfig.from_pretrained(path)
    architecture_of(config)
    check_split_at(split_at, config.num_hidden_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    aliases = _parameter_aliases(model)
    with ExitStack() as files:
        reader = CheckpointReader(path, files)
        if all(reader.holds(names) for names in aliases.values()):
            bottom = Bottom(model, split_at)
            _materialise(bottom, aliases, reader, torch.float32, "cpu")
        else:
            model = _load_converted(path)
            bottom = Bottom(model, split_at)
        bottom_sha256 = bottom_fingerprint(model, split_at)
        _drop(bottom)  # the data party's weights: hashed, never kept
        stack = LayerStack(model, split_at, config.num_hidden_layers)
        head = Head(model)
        for part in (stack, head):
            if next(part.parameters()).is_meta:
                _materialise(part, aliases, reader, dtype, device)
                _init_buffers(model, part, device)
            else:
                _move(part, dtype, device)
    tokenizer = load_tokenizer(path)
    return LoadedTop(
        model=model,
        stack=stack,
        head=head,
        tokenizer=tokenizer,
        base_config_sha256=config_fingerprint(model),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        bottom_sha256=bottom_sha256,
    )


def _load_converted(path: Path) -> PreTrainedModel:
    """The whole model through HF's loader, for checkpoints that store some parameters in another
    layout than the model holds them (transformers 5 fuses MoE experts on load). Only that loader
    converts them, so these families hold the whole model, in fp32 for the fingerprint, until its
    bottom is dropped."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


def _move(part: nn.Module, dtype: torch.dtype, device: str) -> None:
    """Cast `part`'s parameters to `dtype` on `device`; computed buffers (rotary frequencies) keep
    their dtype, as on the path that reads the top's tensors alone."""
    for module in part.modules():
        for local, param in list(module.named_parameters(recurse=False)):
            setattr(
                module,
                local,
                nn.Parameter(param.detach().to(device=device, dtype=dtype), requires_grad=False),
            )
        for local, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(
                local, buffer.to(device), persistent=local not in module._non_persistent_buffers_set
            )


def _parameter_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter, keyed by identity: a tied head is also the embedding."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return aliases


def _materialise(
    part: nn.Module, aliases: dict[int, list[str]], reader: CheckpointReader, dtype: torch.dtype, device: str
) -> None:
    """Replace `part`'s meta parameters by frozen ones read from the checkpoint."""
    for module in part.modules():
        for local, param in list(module.named_parameters(recurse=False)):
            names = aliases[id(param)]
            tensor = reader.read(names)
            if tensor.shape != param.shape:
                raise ConfigError(
                    f"checkpoint tensor {names[0]} has shape {tuple(tensor.shape)}; the config needs "
                    f"{tuple(param.shape)}"
                )
            tensor = tensor.to(device=device, dtype=dtype)
            setattr(module, local, nn.Parameter(tensor, requires_grad=False))


def _drop(part: nn.Module) -> None:
    """Put `part`'s parameters back on the meta device, freeing their memory."""
    for module in part.modules():
        for local, param in list(module.named_parameters(recurse=False)):
            setattr(module, local, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def _init_buffers(model: PreTrainedModel, part: nn.Module, device: str) -> None:
    """Compute non-persistent buffers (rotary frequencies), which no checkpoint stores."""
    for module in part.modules():
        own = list(module.buffers(recurse=False))
        if any(buffer.is_meta for buffer in own):
            if any(True for _ in module.parameters(recurse=False)):
                raise RuntimeError(f"bug: {type(module).__name__} mixes weights and computed buffers")
            module.to_empty(device=device, recurse=False)
            # the same initialisation `from_pretrained` applies to buffers missing from the file
            model._init_weights(module)
    leftovers = [name for name, t in _tensors(part) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"bug: {leftovers} still on the meta device after loading the top")


def _tensors(part: nn.Module) -> list[tuple[str, Any]]:
    return [*part.named_parameters(), *part.named_buffers()]
