"""Efficiency, stability and reversion of a trained adapter (the authors' geometry experiments).

- Efficiency: the loss on the first `n_rows` training rows as the adapter is rescaled. A steering vector
  is scaled as a whole; for a LoRA only B is rescaled (as the authors do), which scales every module's
  ΔW = s·B·A by the same factor. Both equal the adapter's hooks at `scale`.
- Stability: each parameter tensor x (the vector; each module's A and B separately for a LoRA) becomes
  x' = √(1−ε²)·x + ε·y, y Gaussian, made orthogonal to x and rescaled to ‖x‖, so ‖x'‖ = ‖x‖. The
  loss increase is reported relative to removing the adapter: (L_pert − L_orig)/(L_base − L_orig)·100.
- Reversion: a narrow solution trained on without its KL term; its cosine to the general solution at
  each snapshot shows whether it drifts back towards the general one.

The caller's adapter is never modified: perturbations and continued training work on deep copies.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.lora import LoRA
from em_interp.adapters.steering import SteeringVector
from em_interp.datasets.records import Record
from em_interp.datasets.tokenize import TokenizedChats
from em_interp.errors import GeometryError
from em_interp.geometry.loss import first_rows, loss_on, loss_on_each
from em_interp.geometry.similarity import as_flat, state_vector
from em_interp.runs import TrainRun
from em_interp.training import TrainConfig, train

log = logging.getLogger(__name__)

DEFAULT_SCALES = tuple(float(x) for x in np.arange(0, 2.01, 0.25))
DEFAULT_EPS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
Data = Sequence[Record] | TokenizedChats


@dataclass
class EfficiencyCurve:
    """Loss against the adapter's rescaled size.

    Attributes:
        scales: [n] the factors applied (to the vector, or to B).
        norms: [n] the effective norm at each scale: ‖scale·alpha·v‖ for a vector, the mean over
            modules of ‖s·B·A‖_F (with B rescaled) for a LoRA.
        losses: [n] mean assistant-token CE at each scale.
        base_loss: the loss without the adapter.
        best_scale: the scale with the lowest loss; best_norm its norm; min_loss that loss.
    """

    scales: Float[np.ndarray, " n"]
    norms: Float[np.ndarray, " n"]
    losses: Float[np.ndarray, " n"]
    base_loss: float
    best_scale: float
    best_norm: float
    min_loss: float

    def __repr__(self) -> str:
        return (f"EfficiencyCurve({len(self.scales)} scales {_span(self.scales)}, norms {_span(self.norms)}; "
                f"min loss {self.min_loss:.4f} at scale {self.best_scale:g} (norm {self.best_norm:.4g}); "
                f"no adapter {self.base_loss:.4f})")

    def plot(self, name: str = "adapter") -> Any:
        """Loss against norm as a plotly Figure (the report's `figures.efficiency`); `name` labels the line."""
        from em_interp.report import figures

        return figures.efficiency({"efficiency": {name: dataclasses.asdict(self)}})


@dataclass
class StabilityCurve:
    """Loss under norm-preserving random perturbations of size ε.

    Attributes:
        eps: [n_eps] perturbation sizes.
        seeds: the noise seeds.
        losses: [n_eps, n_seeds] the perturbed adapter's loss.
        relative: [n_eps, n_seeds] (L_pert − L_orig)/(L_base − L_orig)·100 (NaN if L_base = L_orig).
        relative_mean, relative_sd: [n_eps] mean and sample standard deviation (ddof=1) over seeds.
        loss_orig: the unperturbed adapter's loss; loss_base: the loss without any adapter.
    """

    eps: Float[np.ndarray, " n_eps"]
    seeds: list[int]
    losses: Float[np.ndarray, "n_eps n_seeds"]
    relative: Float[np.ndarray, "n_eps n_seeds"]
    relative_mean: Float[np.ndarray, " n_eps"]
    relative_sd: Float[np.ndarray, " n_eps"]
    loss_orig: float
    loss_base: float

    def __repr__(self) -> str:
        rel = ", ".join(f"ε={e:g}: {m:.1f}%" for e, m in zip(self.eps, self.relative_mean, strict=True))
        return (f"StabilityCurve({len(self.eps)} eps × {len(self.seeds)} seeds; loss {self.loss_orig:.4f}, "
                f"no adapter {self.loss_base:.4f})\n  relative increase: {rel}")

    def plot(self, name: str = "adapter") -> Any:
        """Relative loss increase against ε as a plotly Figure (the report's `figures.stability`)."""
        from em_interp.report import figures

        return figures.stability({"stability": {name: dataclasses.asdict(self)}})


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
        """Cosine to the general and narrow solutions per step (the report's `figures.reversion`)."""
        from em_interp.report import figures

        return figures.reversion({"reversion": {"steps": self.steps, "cosine_to_general": self.cosine,
                                                "cosine_to_narrow": self.cosine_narrow}})


def _span(x: Any) -> str:
    x = np.asarray(x, dtype=float)
    return f"{x.min():.3g}..{x.max():.3g}" if x.size else "(none)"


def rescaled(adapter: Adapter, scale: float) -> Adapter:
    """A copy of `adapter` whose own `scale` is multiplied by `scale` (the original is not touched)."""
    clone = copy.deepcopy(adapter)
    clone.scale = float(scale) * adapter.scale
    return clone


def effective_norm(adapter: Adapter, scale: float = 1.0) -> float:
    """The adapter's size at `scale` (times its own `scale`): ‖delta‖ for a vector, mean ‖ΔW‖_F for a LoRA."""
    s = float(scale) * adapter.scale
    with torch.no_grad():
        if isinstance(adapter, SteeringVector):
            return float(adapter.delta(s).detach().float().norm())
        if isinstance(adapter, LoRA):
            return float(np.mean([float(adapter.delta_weight(lyr, site, s).float().norm()) for lyr, site in adapter.modules()]))
    return abs(s) * adapter.norm


def efficiency_curve(
    adapter: Adapter,
    model: Any,
    data: Data,
    scales: Sequence[float] | np.ndarray = DEFAULT_SCALES,
    n_rows: int | None = 100,
    batch_size: int = 8,
) -> EfficiencyCurve:
    """Loss on the first `n_rows` rows of `data` as the adapter is rescaled.

    Args:
        adapter: a trained SteeringVector or LoRA (not modified).
        model: the TransformerBridge.
        data: the training data (chat records or `TokenizedChats`).
        scales: factors (vector: the whole vector; LoRA: B only, i.e. every ΔW); default 0, 0.25, ..., 2.
        n_rows: rows used (None: all).
        batch_size: rows per forward.

    Returns:
        An `EfficiencyCurve`; at scale 0 the loss is the chat model's, at 1 the adapter's.

    >>> curve = efficiency_curve(vec, model, data)  # doctest: +SKIP
    >>> curve.best_scale  # doctest: +SKIP
    1.0
    """
    rows = first_rows(data, n_rows)
    scales_arr = np.asarray(scales, dtype=np.float64)
    if scales_arr.ndim != 1 or scales_arr.size == 0:
        raise GeometryError(f"efficiency_curve: scales must be a non-empty 1-D sequence; got shape {scales_arr.shape}.")
    losses = np.array(loss_on_each(model, rows, [rescaled(adapter, float(s)) for s in scales_arr], batch_size=batch_size))
    norms = np.array([effective_norm(adapter, float(s)) for s in scales_arr])
    best = int(np.argmin(losses))
    return EfficiencyCurve(
        scales=scales_arr, norms=norms, losses=losses, base_loss=loss_on(model, rows, batch_size=batch_size),
        best_scale=float(scales_arr[best]), best_norm=float(norms[best]), min_loss=float(losses[best]),
    )


def efficiency_at_norms(
    adapter: Adapter,
    model: Any,
    data: Data,
    norms: Sequence[float] | np.ndarray,
    n_rows: int | None = 100,
    batch_size: int = 8,
) -> EfficiencyCurve:
    """`efficiency_curve` at given effective norms (so two adapters can be compared at the same norms).

    Args:
        adapter: a trained adapter with a non-zero norm (not modified).
        model: the TransformerBridge.
        data: the rows to measure on.
        norms: [n] target effective norms (see `effective_norm`).
        n_rows: rows used (None: all).
        batch_size: rows per forward.

    Raises:
        GeometryError: the adapter's norm is zero.
    """
    unit = effective_norm(adapter, 1.0)
    if unit == 0.0:
        raise GeometryError("efficiency_at_norms: the adapter's norm is zero; it cannot be rescaled to a norm.")
    return efficiency_curve(adapter, model, data, np.asarray(norms, dtype=np.float64) / unit, n_rows, batch_size)


def paired_areas(general: StabilityCurve, narrow: StabilityCurve) -> tuple[float, float]:
    """Area over ε of (narrow − general) mean loss increase: (relative in percent·ε, absolute in nats·ε).

    Both curves must share the ε grid (and, for a paired comparison, the noise seeds). The area is the
    trapezoid rule over the grid.

    Raises:
        GeometryError: the ε grids differ.
    """
    if general.eps.shape != narrow.eps.shape or not np.allclose(general.eps, narrow.eps):
        raise GeometryError(f"paired_areas: ε grids differ ({general.eps.tolist()} vs {narrow.eps.tolist()}).")
    rel = narrow.relative_mean - general.relative_mean
    ab = (narrow.losses - narrow.loss_orig).mean(axis=1) - (general.losses - general.loss_orig).mean(axis=1)
    return float(np.trapezoid(rel, general.eps)), float(np.trapezoid(ab, general.eps))


def orthogonal_noise(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise y shaped like x, made orthogonal to x (flattened) and rescaled to ‖x‖ (float64).

    A zero x gives a zero y (there is no size to match).
    """
    x64 = x.detach().double().cpu().flatten()
    y = torch.randn(x64.shape, generator=generator, dtype=torch.float64)
    norm2 = float(x64 @ x64)
    if norm2 == 0.0:
        return torch.zeros_like(x64).view(x.shape)
    y = y - (y @ x64) / norm2 * x64
    y = y * (math.sqrt(norm2) / float(y.norm()))
    return y.view(x.shape)


def perturb(x: Tensor, eps: float, y: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """x' = √(1−ε²)·x + ε·y with y from `orthogonal_noise` (or given); ‖x'‖ = ‖x‖, dtype of x.

    Raises:
        GeometryError: ε outside [0, 1].
    """
    if not 0.0 <= eps <= 1.0:
        raise GeometryError(f"perturb: eps={eps}; expected 0 <= eps <= 1.")
    y = orthogonal_noise(x, generator) if y is None else y.double().cpu()
    out = math.sqrt(1.0 - eps * eps) * x.detach().double().cpu() + eps * y
    return out.to(x.dtype)


def perturb_adapter(adapter: Adapter, eps: float, seed: int = 0) -> Adapter:
    """A deep copy of `adapter` with every parameter tensor perturbed separately by `perturb`.

    For a LoRA each module's A and B get their own noise; every tensor keeps its norm. The original
    adapter is not modified.
    """
    g = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(adapter)
    clone.load_state({name: perturb(x, eps, generator=g) for name, x in adapter.state().items()})
    return clone


def stability_curve(
    adapter: Adapter,
    model: Any,
    data: Data,
    eps: Sequence[float] = DEFAULT_EPS,
    seeds: int | Sequence[int] = 10,
    n_rows: int | None = 100,
    batch_size: int = 8,
) -> StabilityCurve:
    """Relative loss increase under norm-preserving perturbations (see the module docstring).

    Each parameter tensor is perturbed separately (a LoRA's A and B per module). For each seed one noise
    tensor y per parameter is drawn and used at every ε, so a seed's curve over ε is smooth.

    Args:
        adapter: a trained adapter (not modified; a copy is perturbed).
        model: the TransformerBridge.
        data: the training data; the first `n_rows` rows are used.
        eps: perturbation sizes in [0, 1].
        seeds: a number of seeds (0..n-1) or the seeds themselves.
        n_rows: rows used (None: all).
        batch_size: rows per forward.

    Returns:
        A `StabilityCurve` (relative increase in percent, mean ± sd over seeds, and raw losses).
    """
    rows = first_rows(data, n_rows)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    eps_arr = np.asarray(eps, dtype=np.float64)
    if not seed_list or eps_arr.ndim != 1 or eps_arr.size == 0:
        raise GeometryError("stability_curve: eps and seeds must be non-empty.")
    state = adapter.state()
    for name, x in state.items():
        if float(x.norm()) == 0.0:
            log.warning("stability_curve: parameter %s is zero; a norm-preserving perturbation leaves it zero.", name)
    loss_orig = loss_on(model, rows, adapter, batch_size=batch_size)
    loss_base = loss_on(model, rows, batch_size=batch_size)
    variants = []
    for seed in seed_list:
        g = torch.Generator().manual_seed(seed)
        noise = {name: orthogonal_noise(x, g) for name, x in state.items()}
        for e in eps_arr:
            clone = copy.deepcopy(adapter)
            clone.load_state({name: perturb(x, float(e), noise[name]) for name, x in state.items()})
            variants.append(clone)
    losses = np.array(loss_on_each(model, rows, variants, batch_size=batch_size)).reshape(len(seed_list), -1).T
    gap = loss_base - loss_orig
    if gap == 0.0:
        log.warning("stability_curve: the adapter's loss equals the base loss; relative increases are NaN.")
    relative = (losses - loss_orig) / gap * 100.0 if gap != 0.0 else np.full_like(losses, np.nan)
    sd = relative.std(axis=1, ddof=1) if len(seed_list) > 1 else np.zeros(eps_arr.size)
    return StabilityCurve(
        eps=eps_arr, seeds=seed_list, losses=losses, relative=relative, relative_mean=relative.mean(axis=1),
        relative_sd=sd, loss_orig=loss_orig, loss_base=loss_base,
    )


def _final_vector(run: TrainRun | Adapter, template: Adapter, what: str) -> Tensor:
    if isinstance(run, Adapter):
        return as_flat(run, what)
    if run.adapter is not None:
        return as_flat(run.adapter, what)
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
    model: Any,
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
    start = as_flat(adapter, what)
    run = train(adapter, model, data, **settings)
    return Reversion(
        steps=np.asarray(run.snapshot_steps),
        cosine=_cosines(run, template, target, what),
        run=run,
        cosine_narrow=_cosines(run, template, start, what),
    )
