"""Geometry of adapters and trajectories: cosine, trajectory PCA, efficiency, stability, KL vs norm.

Reversion trains, so it lives with training (`em.reversion`, `em_interp.training.continuation`); `em.geometry.reversion`
still works, with a DeprecationWarning.

>>> import em_interp as em
>>> em.geometry.cosine(general_vec, narrow_vec)                           # doctest: +SKIP
>>> em.geometry.trajectory_pca([run_general, run_narrow], n_components=3)  # doctest: +SKIP
>>> em.geometry.efficiency_curve(vec, model, data)                        # doctest: +SKIP
>>> em.geometry.stability_curve(vec, model, data, seeds=10)               # doctest: +SKIP
"""

from typing import Any

from em_interp.geometry.curves import (
    DEFAULT_EPS,
    DEFAULT_SCALES,
    EfficiencyCurve,
    StabilityCurve,
    effective_norm,
    efficiency_curve,
    orthogonal_noise,
    perturb,
    perturb_adapter,
    stability_curve,
)
from em_interp.geometry.kl_norm import KLNormCurve, kl_vs_norm, kl_vs_norm_each, unit_vector
from em_interp.geometry.loss import clear_loss_cache, loss_on, loss_on_each
from em_interp.geometry.pca import TrajectoryPCA, trajectory_pca
from em_interp.geometry.similarity import CosineMatrix, as_flat, cosine, cosine_matrix, state_vector
from em_interp.interventions import Direction, as_direction

__all__ = [
    "DEFAULT_EPS", "DEFAULT_SCALES", "CosineMatrix", "Direction", "EfficiencyCurve", "KLNormCurve", "StabilityCurve", "TrajectoryPCA", "as_direction", "as_flat",
    "clear_loss_cache", "cosine", "cosine_matrix", "effective_norm", "efficiency_curve", "kl_vs_norm", "kl_vs_norm_each", "loss_on", "loss_on_each",
    "orthogonal_noise", "perturb", "perturb_adapter", "stability_curve", "state_vector", "trajectory_pca", "unit_vector",
]


def __getattr__(name: str) -> Any:
    # `reversion` trains, so it moved to the training side (em_interp.training.continuation); the old name works for now.
    if name in ("reversion", "Reversion"):
        from em_interp.geometry import curves

        return getattr(curves, name)  # warns
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
