"""Checkpoint files for resumable training: safetensors for tensors, JSON for the rest, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from em_interp.errors import TrainingError
from em_interp.fileio import atomic_file, write_text

TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


def optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (by key) and JSON-able metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    for idx, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"{prefix}.{idx}.{slot}"] = torch.as_tensor(value).detach().cpu().clone()
    return tensors, {"param_groups": state["param_groups"], "slots": {str(i): list(s) for i, s in state["state"].items()}}


def restore_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    device = optimizer.param_groups[0]["params"][0].device
    state = {int(i): {slot: tensors[f"{prefix}.{i}.{slot}"].to(device) for slot in slots} for i, slots in meta["slots"].items()}
    for slots in state.values():  # Adam keeps `step` on the CPU
        if "step" in slots:
            slots["step"] = slots["step"].cpu()
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write(directory: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write both files atomically (each to a temp name, then renamed; metadata last)."""
    with atomic_file(directory / TENSORS) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_text(directory / META, json.dumps(meta, default=float))


def read(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The checkpoint in `directory`, or None if there is none."""
    if not (directory / META).is_file():
        return None
    try:
        meta = json.loads((directory / META).read_text())
        tensors = load_file(str(directory / TENSORS))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{directory}: unreadable checkpoint ({exc}).") from None
    return tensors, meta
