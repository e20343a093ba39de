"""`TrainRun`: the record of one training run (losses, trajectory snapshots, config), saved as a run dir.

A run dir holds `run.json` (config, losses, snapshot steps, wall time, versions, device),
`trajectory.safetensors` (every snapshot of every parameter, stacked) and `adapter/` (the final adapter).
It loads without a model; the adapter is rebuilt only when a model is given.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from em_interp._version import __version__
from em_interp.config import TrainConfig
from em_interp.errors import TrainingError
from em_interp.fileio import atomic_directory

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(repr=False)
class TrainRun:
    """Losses per step ({step, ce, kl, total}), parameter snapshots with their steps, config, wall time.

    `data_sizes` holds the number of rows trained on ({"data": n, "kl_data": n_kl}); `repr(run)` is a short
    summary and `run.plot()` draws the losses.
    """

    adapter: Any
    config: TrainConfig
    losses: list[dict[str, float]] = field(default_factory=list)
    snapshot_steps: list[int] = field(default_factory=list)
    snapshots: list[dict[str, Tensor]] = field(default_factory=list)
    wall_time: float = 0.0
    adapter_meta: dict[str, Any] = field(default_factory=dict)
    data_sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, TrainConfig):
            raise TrainingError(f"TrainRun.config must be a TrainConfig; got {type(self.config).__name__} "
                                "(convert a dict with TrainConfig.from_dict).")

    def __repr__(self) -> str:
        meta = self.adapter.metadata() if self.adapter is not None else self.adapter_meta
        opts = meta.get("config") or {}
        where = ", ".join(f"{k}={opts[k]}" for k in ("layer", "hook", "site", "rank") if k in opts)
        last = self.final_losses()
        losses = " ".join(f"{k}={last[k]:.4g}" for k in ("ce", "kl", "total") if isinstance(last.get(k), (int, float)))
        sizes = ", ".join(f"{k} {v} rows" for k, v in self.data_sizes.items())
        c = self.config
        return (f"TrainRun({meta.get('kind', '?')} {where}{f', norm {self.adapter.norm:.4g}' if self.adapter is not None else ', adapter not loaded'}\n"
                f"  {len(self.losses)} steps, {len(self.snapshot_steps)} snapshots, {self.wall_time:.1f} s; "
                f"lr={c.lr:g} kl_coef={c.kl_coef:g} seed={c.seed}\n"
                f"  final: {losses or 'no steps'}{'; ' + sizes if sizes else ''})")

    def plot(self, name: str = "run") -> Any:
        """A plotly `Figure` of CE, KL and total loss per step (the report's training-loss figure)."""
        from em_interp.report.figures import training_losses

        return training_losses({"training": {name: {"losses": self.losses, "kl_coef": self.config.kl_coef}}})

    def record_snapshot(self, step: int) -> None:
        if self.snapshot_steps and self.snapshot_steps[-1] == step:
            return
        self.snapshot_steps.append(step)
        self.snapshots.append(self.adapter.state())

    def stacked_snapshots(self) -> dict[str, Tensor]:
        """Each parameter's snapshots stacked: name -> [n_snapshots, *shape]."""
        if not self.snapshots:
            return {}
        return {k: torch.stack([s[k] for s in self.snapshots]) for k in self.snapshots[0]}

    @property
    def trajectory(self) -> Float[Tensor, "n_snapshots ..."]:
        """[n_snapshots, *param_shape] for a one-parameter adapter, else [n_snapshots, n_params] (flattened)."""
        stacked = self.stacked_snapshots()
        if len(stacked) == 1:
            return next(iter(stacked.values()))
        return self.flat_trajectory()

    def flat_trajectory(self) -> Float[Tensor, "n_snapshots n_params"]:
        """All parameters of each snapshot concatenated (the input of trajectory PCA)."""
        return torch.stack([torch.cat([v.flatten() for v in s.values()]) for s in self.snapshots])

    def final_losses(self) -> dict[str, float]:
        return dict(self.losses[-1]) if self.losses else {}

    def restore(self, meta: dict[str, Any], stacked: dict[str, Tensor]) -> None:
        """Reset losses and snapshots from checkpoint data."""
        self.losses = list(meta["losses"])
        self.snapshot_steps = list(meta["snapshot_steps"])
        self.wall_time = float(meta.get("wall_time", 0.0))
        n = len(self.snapshot_steps)
        self.snapshots = [{k: v[i] for k, v in stacked.items()} for i in range(n)]

    # --- files ---------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the run dir atomically."""
        with atomic_directory(directory) as tmp:
            meta = {
                "config": self.config.to_dict(),
                "data_sizes": self.data_sizes,
                "losses": self.losses,
                "snapshot_steps": self.snapshot_steps,
                "wall_time": self.wall_time,
                "environment": environment(),
            }
            if self.adapter is not None:
                self.adapter.save(tmp / "adapter")
                meta["adapter"] = self.adapter.metadata()
            else:
                meta["adapter"] = self.adapter_meta
            (tmp / "run.json").write_text(json.dumps(meta, indent=1, default=str))
            save_file({k: v.contiguous() for k, v in self.stacked_snapshots().items()}, str(tmp / "trajectory.safetensors"))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: TransformerBridge | None = None) -> TrainRun:
        """Load a run dir; with `model`, also rebuild the final adapter (else `adapter` is None)."""
        directory = Path(directory)
        if not (directory / "run.json").is_file():
            raise TrainingError(f"{directory}: no run.json; expected a run dir written by TrainRun.save.")
        meta = json.loads((directory / "run.json").read_text())
        adapter = None
        if model is not None:
            from em_interp.adapters.base import Adapter

            adapter = Adapter.load(directory / "adapter", model)
        config = TrainConfig.from_dict(meta["config"], where=f"{directory / 'run.json'}: config")
        run = cls(adapter=adapter, config=config, adapter_meta=meta.get("adapter", {}),
                  data_sizes=dict(meta.get("data_sizes") or {}))
        run.restore(meta, load_file(str(directory / "trajectory.safetensors")))
        return run


def environment() -> dict[str, Any]:
    """Versions and device facts recorded with every run."""
    import importlib.metadata

    import transformers

    return {
        "em_interp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }
