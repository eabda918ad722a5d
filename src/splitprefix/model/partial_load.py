"""Loading only some parts of a model, tensor by tensor, straight from its safetensors checkpoint.

The model is built on the meta device, which costs no memory. Only the parameters of the parts a
role runs (the bottom, a stack of layers, the head) are then read from the file(s) and put in place,
in the dtype and on the device asked for; every other parameter stays on the meta device. Both
parties use it: the server for layers [K, L) and the head, the data party for its bottom (and head),
and `emulate` to copy the kept tensors of a checkpoint into an emulator without the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from splitprefix.errors import ConfigError
from splitprefix.model.loading import checkpoint_dtype, resolve_model_dir
from splitprefix.model.registry import architecture_of

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Reads single tensors by name from a model directory's safetensors file or shards."""

    def __init__(self, directory: Path) -> None:
        if (directory / INDEX_FILE).is_file():
            weight_map: dict[str, str] = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            raise ConfigError(
                f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}; splitprefix reads only safetensors "
                "checkpoints (re-save the model with save_pretrained)"
            )
        self._directory, self._weight_map = directory, weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor `name`, in its stored dtype, on the CPU: the only read of the file.

        It is a view of a memory map of its own: the file's pages it touched are freed as soon as
        the tensor is (once converted to another dtype or device, say), not when the whole part
        is loaded, and writing into it changes no other tensor read.
        """
        with safe_open(self._directory / self._weight_map[name], "pt") as handle:
            return handle.get_tensor(name)

    def read(self, names: Sequence[str]) -> torch.Tensor:
        """The first of `names` (aliases of one tied parameter) that the checkpoint holds."""
        for name in names:
            for candidate in (name, name.split(".", 1)[-1]):  # old checkpoints omit the backbone prefix
                if candidate in self._weight_map:
                    return self.tensor(candidate)
        raise ConfigError(f"the checkpoint holds no tensor named {' or '.join(names)}; is it complete?")

    def holds(self, names: Sequence[str]) -> bool:
        """Whether the checkpoint stores a tensor under one of `names`."""
        return any(c in self._weight_map for name in names for c in (name, name.split(".", 1)[-1]))


class ConvertedReader(CheckpointReader):
    """The tensors of a checkpoint that stores some parameters in another layout than the model
    holds them: transformers 5 saves MoE experts one by one and fuses them on load. Only its loader
    converts them, so such a model is loaded whole, once, in its stored dtype; every role then
    takes its parts from it as from the file."""

    def __init__(self, directory: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=checkpoint_dtype(directory))
        self._tensors = {name: t.detach() for name, t in model.state_dict().items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def read(self, names: Sequence[str]) -> torch.Tensor:
        for name in names:
            if name in self._tensors:
                return self._tensors[name]
        raise ConfigError(f"the model holds no tensor named {' or '.join(names)}")

    def holds(self, names: Sequence[str]) -> bool:
        return any(name in self._tensors for name in names)


def open_checkpoint(directory: Path, skeleton: PreTrainedModel) -> CheckpointReader:
    """A reader of the checkpoint in `directory` by the names of `skeleton`'s tensors: the file
    itself, tensor by tensor, or (when it stores them under other names) `ConvertedReader`."""
    reader = CheckpointReader(directory)
    if all(reader.holds(names) for names in tensor_aliases(skeleton).values()):
        return reader
    return ConvertedReader(directory)


def meta_model(config: PretrainedConfig, attn_implementation: str | None = None) -> PreTrainedModel:
    """The model of `config` on the meta device, in eval mode: its shapes and modules, no memory."""
    architecture_of(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tensor_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every stored name of every parameter and persistent buffer, keyed by identity (a tied head is
    also the embedding)."""
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    return aliases


def materialise(
    model: PreTrainedModel,
    reader: CheckpointReader,
    parts: Sequence[nn.Module],
    dtype: torch.dtype | None,
    device: str | torch.device,
    source: Callable[[str], str] = str,
    copy: bool = False,
) -> None:
    """Replace the meta parameters of `parts` (views of `model`) by frozen ones read from `reader`.

    `dtype` None keeps each tensor's stored dtype. `source` maps a name of `model` to the name the
    checkpoint stores it under (the emulator renumbers layers). A parameter tied across parts is read
    once and stays tied. Computed buffers (rotary frequencies) are initialised on `device`.

    A tensor kept in its stored dtype on the CPU is a view of a memory map of the file, whose pages
    are read when first touched: pass `copy=True` for parameters that will be trained in place, so
    that they own their memory.
    """
    aliases = tensor_aliases(model)
    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (meta, loaded); holds the meta alive
    for part in parts:
        for module in part.modules():
            for local, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:
                    continue
                if id(param) not in done:
                    names = aliases[id(param)]
                    tensor = _checked(reader.read([source(n) for n in names]), param, names[0])
                    tensor = tensor.to(device=device, dtype=dtype or tensor.dtype, copy=copy)
                    done[id(param)] = (param, nn.Parameter(tensor, requires_grad=False))
                setattr(module, local, done[id(param)][1])
            for local, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_meta and local not in module._non_persistent_buffers_set:
                    # a stored buffer (a router's bias): read like a weight, kept in its stored dtype
                    names = aliases[id(buffer)]
                    tensor = _checked(reader.read([source(n) for n in names]), buffer, names[0])
                    module.register_buffer(local, tensor.to(device=device, copy=True))
        init_buffers(model, part, device)


def _checked(tensor: torch.Tensor, param: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.shape != param.shape:
        raise ConfigError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; the config needs {tuple(param.shape)}"
        )
    return tensor


def init_buffers(model: PreTrainedModel, part: nn.Module, device: str | torch.device) -> None:
    """Compute non-persistent buffers (rotary frequencies, Gemma's embedding scale), which no
    checkpoint stores, with the initialisation `from_pretrained` applies to them. The module's
    weights are swapped for meta stand-ins meanwhile, so that the initialisation leaves them alone."""
    for module in part.modules():
        meta = {name: b for name, b in module._buffers.items() if b is not None and b.is_meta}
        if not meta:
            continue
        loaded = dict(module._parameters)
        for name, param in loaded.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=False
                )
        for name, buffer in meta.items():
            module._buffers[name] = torch.empty_like(buffer, device=device)
        model._init_weights(module)
        module._parameters.update(loaded)
    leftovers = [name for name, t in _tensors(part) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"bug: {leftovers} still on the meta device after loading")


def drop(part: nn.Module) -> None:
    """Put `part`'s parameters back on the meta device, freeing their memory."""
    for module in part.modules():
        for local, param in list(module.named_parameters(recurse=False)):
            setattr(module, local, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def _tensors(part: nn.Module) -> list[tuple[str, Any]]:
    return [*part.named_parameters(), *part.named_buffers()]


Parts = TypeVar("Parts", bound=tuple[nn.Module | None, ...])


def load_parts(
    model_dir: str | Path,
    parts: Callable[[PreTrainedModel], Parts],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, Parts]:
    """The model in `model_dir` on the meta device with only `parts(model)` read from its checkpoint.

    `parts` returns views of the model (a tuple; None entries are skipped). Returns (model, parts):
    the parts are frozen, in `dtype` on `device`; everything else stays on the meta device and is
    never read from the file.
    """
    path = resolve_model_dir(model_dir)
    model = meta_model(AutoConfig.from_pretrained(path))
    chosen = parts(model)
    materialise(model, open_checkpoint(path, model), [p for p in chosen if p is not None], dtype, device)
    return model, chosen
