"""Resumable training checkpoints: safetensors for tensors, JSON for everything else.

Used by every long job (pretraining, distillation, prefix training). A checkpoint is written to a
temporary folder and renamed into place, so a crash mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from splitprefix.errors import ConfigError


def save_checkpoint(
    root: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `root/step-NNNNNNN` atomically and drop older steps. Returns the checkpoint folder."""
    final, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(module, str(tmp / "model.safetensors"))  # handles tied weights
    state = optimizer.state_dict()
    tensors = {
        f"{pid}.{key}": value.contiguous()
        for pid, entry in state["state"].items()
        for key, value in entry.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {
        "step": step,
        "param_groups": state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "python_random": random.getstate(),
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(meta))
    os.replace(tmp, final)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old)
    return final


def load_checkpoint(
    root: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, dict[str, Any]]:
    """Restore the newest complete checkpoint under `root`. Returns (step, extra), or (0, {}) if none."""
    steps = sorted(root.glob("step-*"))
    if not steps:
        return 0, {}
    latest = steps[-1]
    load_model(module, str(latest / "model.safetensors"))
    meta = json.loads((latest / "state.json").read_text())
    tensors = load_file(str(latest / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for group in meta["param_groups"]:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return meta["step"], meta.get("extra", {})


def check_resumable(root: Path, settings: dict[str, Any]) -> None:
    """Record a run's settings on its first start; refuse to resume a checkpoint made with other settings."""
    path = root / "run_config.json"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, default=str))
        return
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(settings, default=str))
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"{root} holds a run with other settings ({details}); use another output folder or delete it"
        )
