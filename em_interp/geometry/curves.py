"""Efficiency, stability and reversion of a trained adapter (the authors' geometry experiments).

- Efficiency: the loss on the first `n_rows` training rows as the adapter is rescaled. A steering vector
  is scaled as a whole; for a LoRA only B is rescaled (as the authors do), which scales every module's
  ΔW = s·B·A by the same factor. Both equal the adapter's hooks at `scale`.
- Stability: each parameter tensor x (the vector; each module's A and B separately for a LoRA) becomes
  x' = √(1−ε²)·x + ε·y, y Gaussian, made orthogonal to x and rescaled to ‖x‖, so ‖x'‖ = ‖x‖. The
  loss increase is reported relative to removing the adapter: (L_pert − L_orig)/(L_base − L_orig)·100.

Reversion (it trains) lives with training: `em_interp.training.continuation.reversion` (also `em.reversion`);
`geometry.reversion` still works, with a DeprecationWarning.

The caller's adapter is never modified: perturbations work on deep copies.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

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
    model: TransformerBridge,
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
    model: TransformerBridge,
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
    model: TransformerBridge,
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


def __getattr__(name: str) -> Any:
    # Reversion trains, so it moved to the training side; the old names work for one release.
    if name in ("reversion", "Reversion"):
        import warnings

        from em_interp.training import continuation

        warnings.warn(f"em_interp.geometry.{name} moved to em_interp.training.continuation (also em.{name}); the old name "
                      "will be removed.", DeprecationWarning, stacklevel=2)
        return getattr(continuation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
