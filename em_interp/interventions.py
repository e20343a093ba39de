"""One protocol for everything that changes a forward through hooks: adapters, steering and ablation.

An *intervention* (`Intervention`) has

- `scale`: its own multiplier (1 by default);
- `first_layer`: the lowest block whose computation it changes (the blocks below may be cached);
- `hooks(model, scale=1.0, positions=None)`: the (hook name, function) pairs that apply it to `model`;
- `applied(model, scale=1.0, positions=None)`: a context manager attaching those hooks, removed on exit.

`scale` always **multiplies**: an intervention applied with `scale=s` acts as if its own scale were
`s · intervention.scale` (0: no effect). For an adapter that is `s · scale · alpha · v` (steering) or
`s · scale · ΔW` (LoRA); for `Steering` it is `s · scale · r̂`; for `Ablation` it is the fraction of the
projection removed, `h ← h − s · scale · (h·r̂) r̂` (1: full ablation). `positions` uses the vocabulary of
`em_interp.positions` ("all", an int k, or a Bool [batch, pos] mask); None means the intervention's own
(an adapter's is "all").

Adapters (`SteeringVector`, `SteeringSet`, `LoRA`) are interventions with trainable parameters; `Steering`
and `Ablation` wrap a fixed `Direction`. `as_interventions` is the one normaliser of "None, one
intervention, or a list of them" used by training, `loss_on`, `generate`, `contrastive` and `transfer`.

>>> d = em.directions.mean_diff(model, aligned, misaligned, layer=15)  # doctest: +SKIP
>>> with Ablation(d).applied(model):  # doctest: +SKIP
...     texts = em.generate(model, prompts, adapters=[vec, Steering(d, 8.0)])
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from em_interp._version import __version__
from em_interp.adapters.base import Adapter, check_finite, provenance_line
from em_interp.adapters.lora import LoRA
from em_interp.adapters.steering import STEERING_HOOKS, SteeringVector
from em_interp.errors import AdapterError, GeometryError
from em_interp.fileio import atomic_directory, read_saved
from em_interp.model.hooks import HookFn, Positions, attach_hooks, check_positions, hooks_applied, position_weight

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

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
        return f"Direction({self.hook_name}, d_model={self.d_model}){provenance_line(self.provenance, limit=160)}"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `direction.safetensors` + `direction.json` into the directory `path`, atomically."""
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
        meta, tensors = read_saved(path, "direction", writer="Direction.save", version=FORMAT_VERSION,
                                   error=GeometryError, required=("layer",))
        meta_path, tensor_path = Path(path) / "direction.json", Path(path) / "direction.safetensors"
        try:
            layer = int(meta["layer"])
        except (TypeError, ValueError):
            raise GeometryError(f"{meta_path}: layer={meta['layer']!r}; expected an integer.") from None
        if "direction" not in tensors:
            raise GeometryError(f"{tensor_path}: no tensor named 'direction'.")
        hook = str(meta.get("hook", "resid_post"))
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


def check_fits(direction: Direction, model: TransformerBridge, where: str) -> None:
    d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
    if direction.d_model != d_model:
        raise GeometryError(f"{where}: the direction has d_model={direction.d_model}; the model has d_model={d_model}.")
    if not 0 <= direction.layer < n_layers:
        raise GeometryError(f"{where}: the direction is at layer {direction.layer}; the model has {n_layers} layers.")


# --- the protocol -------------------------------------------------------------------------------
@runtime_checkable
class Intervention(Protocol):
    """What adapters, `Steering` and `Ablation` share (see the module docstring)."""

    @property
    def scale(self) -> float:
        """The intervention's own multiplier."""
        ...

    @property
    def first_layer(self) -> int:
        """The lowest block index whose computation this intervention changes."""
        ...

    def hooks(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> list[tuple[str, HookFn]]:
        """(hook name, fn) pairs applying this intervention to `model` at `scale` × its own scale."""
        ...

    def applied(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> AbstractContextManager[Any]:
        """Context manager: the hooks are attached on entry and removed on exit, even on error."""
        ...


def is_intervention(obj: Any) -> bool:
    """True for an object speaking the `Intervention` protocol (an adapter, `Steering`, `Ablation`, ...)."""
    kind = type(obj)
    return all(hasattr(kind, name) for name in ("hooks", "applied", "first_layer")) and hasattr(obj, "scale")


def as_interventions(interventions: Any, where: str = "adapters") -> list[Intervention]:
    """Normalise None / one intervention / an iterable of them to a list (the one normaliser everywhere).

    Raises:
        AdapterError: something that is not an intervention, named by its index in `where`.
    """
    if interventions is None:
        return []
    if is_intervention(interventions):
        return [interventions]
    if isinstance(interventions, (str, bytes, dict)) or not isinstance(interventions, Iterable):
        raise AdapterError(f"{where} of type {type(interventions).__name__}; expected an adapter, a Steering / Ablation, "
                           "or a list of them.")
    out = list(interventions)
    for i, a in enumerate(out):
        if not is_intervention(a):
            raise AdapterError(f"{where}[{i}] is a {type(a).__name__}; expected an adapter, a Steering or an Ablation "
                               "(an object with hooks, applied, first_layer and scale).")
    return out


def check_scale(scale: float | None, where: str) -> float:
    """A caller's multiplier as a finite float (None means 1: the intervention as it is)."""
    return 1.0 if scale is None else check_finite(scale, "scale", where)


def intervention_hooks(model: TransformerBridge, interventions: Any, scale: float | None = 1.0) -> list[tuple[str, HookFn]]:
    """All hooks of several interventions together, each at `scale` × its own scale and its own positions."""
    factor = check_scale(scale, "intervention_hooks")
    return [h for a in as_interventions(interventions) for h in a.hooks(model, factor)]


@contextlib.contextmanager
def interventions_applied(
    model: TransformerBridge, interventions: Any, *, scale: float | None = 1.0, positions: Positions | None = None
) -> Iterator[None]:
    """Apply several interventions together (each via `.applied(model, scale, positions)`); all removed on exit.

    Args:
        model: the TransformerBridge.
        interventions: None, one intervention or a list of them.
        scale: multiplies each intervention's own scale (None: 1).
        positions: where they apply (None: each one's own positions).
    """
    factor = check_scale(scale, "interventions_applied")
    with contextlib.ExitStack() as stack:
        for intervention in as_interventions(interventions):
            stack.enter_context(intervention.applied(model, scale=factor, positions=positions))
        yield


class _HookIntervention:
    """`applied` for the direction interventions, built on their `hooks` (adapters have their own, which also
    refuses applying one adapter twice)."""

    scale: float
    positions: Positions

    def hooks(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> list[tuple[str, HookFn]]:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> Iterator[Any]:
        handle = attach_hooks(model, self.hooks(model, scale, positions))
        try:
            yield self
        finally:
            handle.remove()

    def _setup(self, model: TransformerBridge, scale: float | None, positions: Positions | None, where: str) -> tuple[float, Positions]:
        factor = check_finite(self.scale, "scale", where) * check_scale(scale, f"{where}.applied")
        return factor, check_positions(self.positions if positions is None else positions)


@dataclass
class Steering(_HookIntervention):
    """Adds `scale · r̂` at the direction's hook (its layer) to the selected tokens.

    Attributes:
        direction: the `Direction` r̂ (unit).
        scale: the norm of the added vector (the authors steer with 8 for mean-diff directions).
        positions: "all", an int k (tokens at position >= k) or a Bool [batch, pos] mask.

    `applied(model, scale=s)` adds `s · scale · r̂` (s multiplies, as for every intervention).
    """

    direction: Direction
    scale: float
    positions: Positions = "all"

    @property
    def first_layer(self) -> int:
        return self.direction.layer

    def hooks(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> list[tuple[str, HookFn]]:
        check_fits(self.direction, model, "steer")
        factor, where = self._setup(model, scale, positions, "Steering")
        unit = self.direction.vector

        def add(act: Float[Tensor, "batch pos d_model"], hook: Any) -> Float[Tensor, "batch pos d_model"]:
            delta = (unit * factor).to(act.device, act.dtype)
            weight = position_weight(where, act)
            return act + (delta if weight is None else weight * delta)

        return [(self.direction.hook_name, add)]

    def __repr__(self) -> str:
        return f"Steering({self.direction.hook_name}, scale={self.scale:g})"


@dataclass
class Ablation(_HookIntervention):
    """Projects r̂ out of the residual stream: h ← h − scale · (h·r̂) r̂ (computed in float32).

    With `layers="all"` the projection is applied to the embeddings (`blocks.0.hook_resid_pre`) and after
    every block (`hook_resid_post`), so no block ever reads the direction. The authors add −(h·r̂)r̂ to every
    layer's *output* only; pass `layers=range(n_layers)` for exactly that.

    Attributes:
        direction: the `Direction` r̂ (unit).
        layers: "all" or block indices (see `ablation_hooks`).
        positions: "all", an int k or a Bool [batch, pos] mask.
        scale: the fraction of the projection removed (1: full ablation, 0: none, 2: reflect).
    """

    direction: Direction
    layers: str | Sequence[int] = "all"
    positions: Positions = "all"
    scale: float = 1.0

    @property
    def first_layer(self) -> int:
        if isinstance(self.layers, str) or any(int(x) < 0 for x in self.layers):
            return 0  # the embeddings (or a block counted from the end): the whole model may change
        return min((int(x) for x in self.layers), default=0)

    def hooks(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None) -> list[tuple[str, HookFn]]:
        check_fits(self.direction, model, "ablate")
        factor, where = self._setup(model, scale, positions, "Ablation")
        unit = self.direction.vector

        def project(act: Float[Tensor, "batch pos d_model"], hook: Any) -> Float[Tensor, "batch pos d_model"]:
            u = unit.to(act.device)
            removed = (act.float() @ u).unsqueeze(-1) * u
            if factor != 1.0:
                removed = removed * factor
            weight = position_weight(where, act)
            return act - (removed if weight is None else weight.float() * removed).to(act.dtype)

        return [(name, project) for name in ablation_hooks(model, self.direction, self.layers)]

    def __repr__(self) -> str:
        scale = "" if self.scale == 1.0 else f", scale={self.scale:g}"
        return f"Ablation(layers={self.layers!r}, d_model={self.direction.d_model}{scale})"


def ablation_hooks(model: TransformerBridge, direction: Direction, layers: str | Sequence[int] = "all") -> list[str]:
    """The hook names `ablate` projects at: with layers="all", `blocks.0.hook_resid_pre` (the embeddings)
    and every block's `hook_resid_post`; with a list, `hook_resid_post` of those blocks only."""
    n_layers = int(model.cfg.n_layers)
    if isinstance(layers, str):
        if layers != "all":
            raise GeometryError(f"ablate: layers={layers!r}; expected 'all' or a list of block indices.")
        return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    chosen = []
    for lyr in layers:
        if not -n_layers <= int(lyr) < n_layers:
            raise GeometryError(f"ablate: layer {lyr} is out of range for a model with {n_layers} layers.")
        chosen.append(int(lyr) % n_layers)
    return [f"blocks.{i}.hook_resid_post" for i in sorted(set(chosen))]


@contextlib.contextmanager
def steer(model: TransformerBridge, direction: Direction | Adapter, scale: float, positions: Positions = "all") -> Iterator[Direction]:
    """Context manager adding `scale · r̂` at the direction's hook (its layer); removed on exit.

    Args:
        model: the TransformerBridge.
        direction: a Direction (or a SteeringVector / rank-1 LoRA, see `as_direction`).
        scale: the norm of the added vector (the authors steer with 8 for mean-diff directions).
        positions: "all", an int k (tokens at position >= k) or a Bool [batch, pos] mask.
    """
    d = as_direction(direction)
    with hooks_applied(model, Steering(d, scale, positions).hooks(model)):
        yield d


@contextlib.contextmanager
def ablate(
    model: TransformerBridge, direction: Direction | Adapter, layers: str | Sequence[int] = "all", positions: Positions = "all",
    scale: float = 1.0,
) -> Iterator[Direction]:
    """Context manager projecting r̂ out of the residual stream: h ← h − scale · (h·r̂) r̂ (see `Ablation`).

    Args:
        model: the TransformerBridge.
        direction: a Direction (or SteeringVector / rank-1 LoRA, see `as_direction`).
        layers: "all" or block indices.
        positions: "all", an int k or a Bool [batch, pos] mask.
        scale: the fraction of the projection removed (1: full ablation).
    """
    d = as_direction(direction)
    with hooks_applied(model, Ablation(d, layers, positions, scale).hooks(model)):
        yield d


__all__ = [
    "Ablation", "Direction", "Intervention", "Steering", "ablate", "ablation_hooks", "as_direction", "as_interventions",
    "check_fits", "intervention_hooks", "interventions_applied", "is_intervention", "steer",
]
