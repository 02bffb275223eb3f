"""Checkpoints: the current stage's trainable weights and optimiser state as safetensors + json (no pickle),
written to a temporary folder and renamed, then named in ``latest.json``. A crash or a full disk during a
write leaves the previous checkpoint and pointer untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embedkit.io import atomic_write_dir, atomic_write_text

LATEST = "latest.json"
STATE = "state.json"


class ResumeError(ValueError):
    """A run folder that cannot be resumed by this recipe."""


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser ``state_dict`` into tensors (for safetensors) and plain data (for json)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict = {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        plain["state"][str(pid)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
                plain["state"][str(pid)][key] = {"tensor": f"{pid}.{key}"}
            else:
                plain["state"][str(pid)][key] = {"value": value}
    return tensors, plain


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {}
    for pid, entry in plain["state"].items():
        state[int(pid)] = {key: tensors[v["tensor"]] if "tensor" in v else v["value"] for key, v in entry.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(root: Path, name: str, state: dict, params: dict[str, torch.Tensor] | None,
                    optimizer: torch.optim.Optimizer | None, keep: int) -> Path:
    """Write ``root/name`` atomically and point ``latest.json`` at it; prune all but ``keep`` checkpoints."""
    def fill(folder: Path) -> None:
        if params is not None:
            tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
            save_file(tensors, str(folder / "trainable.safetensors"))
        if optimizer is not None:
            tensors, plain = flatten_optimizer(optimizer.state_dict())
            save_file(tensors, str(folder / "optimizer.safetensors"))
            (folder / "optimizer.json").write_text(json.dumps(plain))
        (folder / STATE).write_text(json.dumps(state, indent=2))  # last: its presence marks a whole checkpoint

    path = atomic_write_dir(root / name, fill)
    atomic_write_text(root / LATEST, json.dumps({"checkpoint": name}))
    existing = sorted((p for p in root.iterdir() if p.is_dir() and (p / STATE).is_file() and p.name != name),
                      key=_order)
    for old in existing[: max(0, len(existing) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest.json`` names (falling back to the newest complete folder)."""
    pointer = root / LATEST
    if pointer.is_file():
        try:
            path = root / json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError):
            path = None
        if path is not None and (path / STATE).is_file():
            return path
    complete = [p for p in root.iterdir() if p.is_dir() and (p / STATE).is_file()] if root.is_dir() else []
    return max(complete, key=_order) if complete else None


def _order(path: Path) -> tuple[int, int]:
    """(completed stages, step): later checkpoints sort later."""
    try:
        state = json.loads((path / STATE).read_text())
        return int(state["stage"]), int(state["step"])
    except (OSError, ValueError, KeyError):
        return -1, -1


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor] | None, tuple | None]:
    """(state, trainable tensors or None, (optimizer tensors, optimizer json) or None)."""
    state = json.loads((path / STATE).read_text())
    params = load_file(str(path / "trainable.safetensors")) if (path / "trainable.safetensors").is_file() else None
    opt = None
    if (path / "optimizer.safetensors").is_file():
        opt = (load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text()))
    return state, params, opt
