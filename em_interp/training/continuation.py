"""Continuing a trained run: `reversion`, the narrow solution trained on without its KL term.

`continue_run` (in `em_interp.training.loop`) continues any run with new settings; `reversion` continues a copy
of a narrow (KL-regularised) run with `kl_coef=0` and tracks the cosine of each snapshot to the general
solution and to its own start, which shows whether it drifts back towards the general one.

>>> rev = em.reversion(run_narrow, run_general, model, data, steps=40, record_every=2)  # doctest: +SKIP
>>> rev.cosine[-1] > rev.cosine[0]  # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.flat import adapter_vector, state_vector
from em_interp.datasets.records import Record
from em_interp.datasets.tokenize import TokenizedChats
from em_interp.errors import GeometryError
from em_interp.training.loop import TrainConfig, train
from em_interp.training.runs import TrainRun

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Data = Sequence[Record] | TokenizedChats


def _span(x: Any) -> str:
    x = np.asarray(x, dtype=float)
    return f"{x.min():.3g}..{x.max():.3g}" if x.size else "(none)"


@dataclass
class Reversion:
    """A narrow run continued without KL, compared with the general solution.

    Attributes:
        steps: [n_snapshots] steps of the continued run (0 = the narrow solution).
        cosine: [n_snapshots] cosine of each snapshot to the general solution.
        run: the continued `TrainRun` (its adapter is a copy; feed it to `trajectory_pca`).
        cosine_narrow: [n_snapshots] cosine of each snapshot to the narrow starting point.
    """

    steps: np.ndarray
    cosine: np.ndarray
    run: TrainRun
    cosine_narrow: np.ndarray

    def __repr__(self) -> str:
        return (f"Reversion({len(self.steps)} snapshots, steps {_span(self.steps)}; cosine to general "
                f"{self.cosine[0]:.3f} → {self.cosine[-1]:.3f}, to narrow {self.cosine_narrow[0]:.3f} → "
                f"{self.cosine_narrow[-1]:.3f})" if len(self.steps) else "Reversion(no snapshots)")

    def plot(self) -> Any:
        """Cosine to the general and narrow solutions per step (the report's `study_figures.reversion`)."""
        from em_interp.report import study_figures

        return study_figures.reversion({"reversion": {"steps": self.steps, "cosine_to_general": self.cosine,
                                                "cosine_to_narrow": self.cosine_narrow}})



def _final_vector(run: TrainRun | Adapter, template: Adapter, what: str) -> Tensor:
    if isinstance(run, Adapter):
        return adapter_vector(run, what)
    if run.adapter is not None:
        return adapter_vector(run.adapter, what)
    if not run.snapshots:
        raise GeometryError("reversion: the general run has neither an adapter nor snapshots.")
    return state_vector(template, run.snapshots[-1], what)


def _cosines(run: TrainRun, template: Adapter, target: Tensor, what: str) -> np.ndarray:
    out = []
    for snap in run.snapshots:
        v = state_vector(template, snap, what).double()
        if v.shape != target.shape:
            raise GeometryError(f"reversion: runs differ in size ({v.numel()} vs {target.numel()} entries).")
        denom = float(v.norm() * target.double().norm())
        out.append(float("nan") if denom == 0.0 else float(v @ target.double()) / denom)
    return np.array(out)


def reversion(
    narrow_run: TrainRun,
    general_run: TrainRun | Adapter,
    model: TransformerBridge,
    data: Data,
    steps: int | None = None,
    what: str = "delta_w",
    **train_kwargs: Any,
) -> Reversion:
    """Continue the narrow solution with `kl_coef=0` and track its cosine to the general solution.

    The narrow run's adapter is deep-copied (never modified) and trained on `data` with the narrow run's
    settings, overridden by `kl_coef=0`, `steps` and `train_kwargs` (e.g. `record_every`, `progress`).

    Args:
        narrow_run: the KL-regularised narrow run (with its adapter).
        general_run: the general solution (a run or an adapter of the same kind and shape).
        model: the TransformerBridge.
        data: the narrow training data (chat records or `TokenizedChats`).
        steps: optimizer steps of the continuation (None: the narrow run's steps/epochs).
        what: what is compared for a LoRA ("delta_w" default, "A", "B", "params").
        **train_kwargs: other `train` arguments.

    Returns:
        A `Reversion` with the snapshot steps, cosines to the general and to the narrow solution, and
        the new run (for `trajectory_pca`).
    """
    if narrow_run.adapter is None:
        raise GeometryError("reversion: the narrow run has no adapter; load it with TrainRun.load(dir, model).")
    config = narrow_run.config
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in settings.items() if k in fields}
    settings.update(kl_coef=0.0)
    if steps is not None:
        settings["steps"] = int(steps)
    settings.update(train_kwargs)
    adapter = copy.deepcopy(narrow_run.adapter)
    template = copy.deepcopy(adapter)
    target = _final_vector(general_run, template, what)
    start = adapter_vector(adapter, what)
    run = train(adapter, model, data, **settings)
    return Reversion(
        steps=np.asarray(run.snapshot_steps),
        cosine=_cosines(run, template, target, what),
        run=run,
        cosine_narrow=_cosines(run, template, start, what),
    )
