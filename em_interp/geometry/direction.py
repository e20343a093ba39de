"""The `Direction` type: a unit vector in one layer's residual stream, with its provenance; file I/O.

Operations on directions (mean-difference extraction, steering, ablation, transfer) live in
`em_interp.directions`, which re-exports this type.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.lora import LoRA
from em_interp.adapters.steering import STEERING_HOOKS, SteeringVector
from em_interp.errors import GeometryError
from em_interp.fileio import atomic_directory

FORMAT_VERSION = 1


@dataclass
class Direction:
    """A unit vector in the residual stream of one layer, with where and how it was obtained.

    Attributes:
        vector: [d_model] float32, normalised to unit length on construction.
        layer: block index whose `hook` it was read at (and where `steer` adds it).
        hook: "resid_post" (default), "resid_pre", "resid_mid", "mlp_out" or "attn_out".
        provenance: method, positions, n_a, n_b, model_id, raw_norm (‖mean_b − mean_a‖), ...
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    hook: str = "resid_post"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hook not in STEERING_HOOKS:
            raise GeometryError(f"Direction: hook={self.hook!r}; expected one of {', '.join(STEERING_HOOKS)}.")
        v = torch.as_tensor(self.vector).detach().float().cpu()
        if v.ndim != 1:
            raise GeometryError(f"Direction: vector has shape {tuple(v.shape)}; expected [d_model].")
        norm = float(v.norm())
        if norm == 0.0 or not torch.isfinite(v).all():
            raise GeometryError(f"Direction: vector has norm {norm}; expected a finite, non-zero vector.")
        self.vector = v / norm
        self.layer = int(self.layer)

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.{STEERING_HOOKS[self.hook]}"

    def __repr__(self) -> str:
        from em_interp.adapters.base import provenance_line

        return f"Direction({self.hook_name}, d_model={self.d_model}){provenance_line(self.provenance, limit=160)}"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `direction.safetensors` + `direction.json` into the directory `path`, atomically."""
        from em_interp._version import __version__

        path = Path(path)
        meta = {"format_version": FORMAT_VERSION, "library_version": __version__, "kind": "direction",
                "layer": self.layer, "hook": self.hook, "d_model": self.d_model, "provenance": self.provenance}
        with atomic_directory(path) as tmp:
            save_file({"direction": self.vector.contiguous()}, str(tmp / "direction.safetensors"))
            (tmp / "direction.json").write_text(json.dumps(meta, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Direction:
        """Read a directory written by `save` (never unpickles anything)."""
        path = Path(path)
        meta_path, tensor_path = path / "direction.json", path / "direction.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise GeometryError(f"{path}: expected direction.json and direction.safetensors (written by Direction.save).")
        try:
            meta = json.loads(meta_path.read_text())
            layer, hook = int(meta["layer"]), str(meta.get("hook", "resid_post"))
        except (ValueError, KeyError, TypeError) as exc:
            raise GeometryError(f"{meta_path}: unreadable direction metadata ({exc!r}).") from None
        if int(meta.get("format_version", 1)) > FORMAT_VERSION:
            raise GeometryError(f"{meta_path}: format_version {meta['format_version']} is newer than this library's.")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # safetensors raises its own SafetensorError on truncated or corrupt files
            raise GeometryError(f"{tensor_path}: not a readable safetensors file ({exc}); save the direction again.") from None
        if "direction" not in tensors:
            raise GeometryError(f"{tensor_path}: no tensor named 'direction'.")
        return cls(tensors["direction"], layer, hook, dict(meta.get("provenance") or {}))


def as_direction(source: Direction | Adapter) -> Direction:
    """A Direction from a Direction (itself), a SteeringVector (its vector, at its hook and layer) or a
    rank-1 LoRA on one "mlp_out"/"attn_out" module (the column of B, i.e. what it writes into the residual
    stream; the sign is B's, the update's sign depends on the input).

    Raises:
        GeometryError: any other object.
    """
    if isinstance(source, Direction):
        return source
    if isinstance(source, SteeringVector):
        raw = float(source.delta(source.scale).detach().float().norm())
        prov = {"method": "steering_vector", "model_id": source.signature.get("model_id"), "alpha": source.alpha, "raw_norm": raw}
        return Direction(source.vector.detach(), source.layer, source.hook, prov)
    if isinstance(source, LoRA) and source.rank == 1 and len(source.modules()) == 1:
        layer, site = source.modules()[0]
        if site in ("mlp_out", "attn_out"):
            b = source.B[f"L{layer}_{site}"].detach()[:, 0]
            prov = {"method": "lora_B", "model_id": source.signature.get("model_id"), "site": site, "raw_norm": float(b.norm())}
            return Direction(b, layer, site, prov)
    raise GeometryError(
        f"cannot take a direction of a {type(source).__name__}; expected a Direction, a SteeringVector or a "
        "rank-1 LoRA on a single mlp_out/attn_out module."
    )


def check_fits(direction: Direction, model: Any, where: str) -> None:
    d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
    if direction.d_model != d_model:
        raise GeometryError(f"{where}: the direction has d_model={direction.d_model}; the model has d_model={d_model}.")
    if not 0 <= direction.layer < n_layers:
        raise GeometryError(f"{where}: the direction is at layer {direction.layer}; the model has {n_layers} layers.")
