"""PCA of training trajectories: one sklearn PCA fitted jointly on the snapshots of several runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float
from sklearn.decomposition import PCA
from torch import Tensor

from em_interp.errors import GeometryError
from em_interp.training.runs import TrainRun


@dataclass
class TrajectoryPCA:
    """A PCA of parameter snapshots and each run's path in its coordinates.

    Attributes:
        explained_variance_ratio: [k] fraction of the joint variance along each component.
        components: [k, n_params] the principal axes (unit rows).
        mean: [n_params] the mean snapshot subtracted before projecting.
        paths: one [n_snapshots, k] array per run (its snapshots projected).
        steps: one [n_snapshots] array of training steps per run (0, 1, ... for plain tensors).
        names: the runs' names.
    """

    explained_variance_ratio: Float[np.ndarray, " k"]
    components: Float[np.ndarray, "k n_params"]
    mean: Float[np.ndarray, " n_params"]
    paths: list[np.ndarray]
    steps: list[np.ndarray]
    names: list[str]

    def __repr__(self) -> str:
        evr = ", ".join(f"{v:.1%}" for v in self.explained_variance_ratio)
        runs = "; ".join(f"{n}: {len(s)} snapshots (steps {int(s[0])}..{int(s[-1])})" if len(s) else f"{n}: empty"
                         for n, s in zip(self.names, self.steps, strict=True))
        return (f"TrajectoryPCA(k={len(self.explained_variance_ratio)}, n_params={self.mean.shape[0]}, "
                f"explained=[{evr}])\n  runs: {runs}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready section the study stores as `results["pca"]` (names, variance ratios, paths, steps)."""
        return {"explained_variance_ratio": self.explained_variance_ratio.tolist(), "names": list(self.names),
                "paths": {n: p.tolist() for n, p in zip(self.names, self.paths, strict=True)},
                "steps": {n: np.asarray(s).tolist() for n, s in zip(self.names, self.steps, strict=True)}}

    def plot(self) -> Any:
        """The runs' paths on PC1/PC2 as a plotly Figure (the report's `figures.trajectory_pca`)."""
        from em_interp.report import figures

        return figures.trajectory_pca({"pca": self.to_dict()})

    def project(self, run: TrainRun | Tensor | np.ndarray) -> Float[np.ndarray, "n_snapshots k"]:
        """Project another run's snapshots (or an array [n, n_params]) onto the fitted components."""
        x, _ = _trajectory(run)
        if x.shape[1] != self.mean.shape[0]:
            raise GeometryError(f"project: snapshots have {x.shape[1]} parameters; the PCA was fitted on {self.mean.shape[0]}.")
        return (x - self.mean) @ self.components.T


def _trajectory(run: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(run, TrainRun):
        if not run.snapshots:
            raise GeometryError("trajectory_pca: a run has no snapshots (train with record_every set).")
        return run.flat_trajectory().double().numpy(), np.asarray(run.snapshot_steps)
    if isinstance(run, Tensor):
        x = run.detach().double().cpu().numpy()
    elif isinstance(run, np.ndarray):
        x = run.astype(np.float64)
    else:
        raise GeometryError(f"trajectory_pca: got a {type(run).__name__}; expected a TrainRun or a [n_snapshots, ...] array.")
    x = x.reshape(x.shape[0], -1)
    return x, np.arange(x.shape[0])


def trajectory_pca(
    runs: Sequence[TrainRun | Tensor] | Mapping[str, TrainRun | Tensor], n_components: int = 3
) -> TrajectoryPCA:
    """Fit one PCA on all runs' snapshots (`flat_trajectory`) and project each run onto it.

    Args:
        runs: TrainRuns (or tensors [n_snapshots, ...]) of adapters with the same parameter shapes;
            a mapping gives them names (default "run0", "run1", ...).
        n_components: k (reduced to the number of snapshots or parameters when fewer).

    Returns:
        A `TrajectoryPCA` with explained variance ratios, components, and per-run paths and steps.

    Raises:
        GeometryError: no runs, a run without snapshots, or runs with different parameter counts.

    >>> pca = trajectory_pca([run_general, run_narrow], n_components=3)  # doctest: +SKIP
    >>> pca.paths[0].shape  # doctest: +SKIP
    (21, 3)
    """
    if isinstance(runs, Mapping):
        names, items = [str(k) for k in runs], list(runs.values())
    else:
        items = list(runs)
        names = [f"run{i}" for i in range(len(items))]
    if not items:
        raise GeometryError("trajectory_pca: no runs given.")
    trajectories = [_trajectory(r) for r in items]
    sizes = {x.shape[1] for x, _ in trajectories}
    if len(sizes) > 1:
        raise GeometryError(f"trajectory_pca: runs have different parameter counts {sorted(sizes)}; use runs of one adapter shape.")
    stacked = np.concatenate([x for x, _ in trajectories])
    k = min(n_components, stacked.shape[0], stacked.shape[1])
    if k < 1:
        raise GeometryError(f"trajectory_pca: n_components={n_components}; expected >= 1.")
    pca = PCA(n_components=k).fit(stacked)
    assert pca.components_ is not None  # set by fit
    return TrajectoryPCA(
        explained_variance_ratio=pca.explained_variance_ratio_,
        components=pca.components_,
        mean=pca.mean_,
        paths=[pca.transform(x) for x, _ in trajectories],
        steps=[s for _, s in trajectories],
        names=names,
    )
