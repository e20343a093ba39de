"""Cosine similarity between adapters, directions, runs and plain tensors.

What is compared (`what`):
- tensors / arrays: flattened as given;
- a `SteeringVector` or a `Direction`: its vector (`alpha` and `scale` are positive scalars, so they do
  not change a cosine);
- a `LoRA`: by default ("delta_w") the effective ΔW = s·B·A of every module, flattened and concatenated
  in `modules()` order — the quantity that is invariant to the B/A gauge (B·c, A/c); "A" or "B" the
  factors alone, "params" all parameters as `flat()` gives them;
- a `TrainRun`: its final adapter (or, when loaded without a model, its last snapshot);
- any other `Adapter`: `flat()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.flat import WHATS, adapter_vector, check_what, state_vector
from em_interp.adapters.lora import LoRA
from em_interp.errors import GeometryError
from em_interp.training.runs import TrainRun

__all__ = ["WHATS", "CosineMatrix", "as_flat", "cosine", "cosine_matrix", "state_vector"]


def as_flat(x: Any, what: str = "delta_w") -> Float[Tensor, " n"]:
    """The float32 CPU vector that `cosine` compares for `x` (see the module docstring).

    Args:
        x: a tensor, numpy array, SteeringVector, LoRA, other Adapter, Direction or TrainRun.
        what: for a LoRA, "delta_w" (default), "A", "B" or "params"; ignored for other objects
            except that "A"/"B" are refused for non-LoRA adapters.

    Returns:
        A detached 1-D float32 tensor on the CPU.

    Raises:
        GeometryError: unknown `what`, or an object of an unsupported type.
    """
    check_what(what)
    if isinstance(x, Tensor):
        return x.detach().float().cpu().flatten()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float32)).flatten()
    if isinstance(x, TrainRun):
        return _run_vector(x, what)
    if isinstance(x, Adapter):
        return adapter_vector(x, what)
    vector = getattr(x, "vector", None)
    if isinstance(vector, Tensor):  # a Direction, or anything else carrying one vector
        return vector.detach().float().cpu().flatten()
    raise GeometryError(
        f"cannot take a vector of a {type(x).__name__}; expected a tensor, array, adapter, Direction or TrainRun."
    )


def _run_vector(run: TrainRun, what: str) -> Tensor:
    if run.adapter is not None:
        return as_flat(run.adapter, what)
    if not run.snapshots:
        raise GeometryError("the run has neither an adapter nor snapshots; load it with a model.")
    return state_vector(None, run.snapshots[-1], what)


def _cos(a: Tensor, b: Tensor, names: tuple[str, str]) -> float:
    if a.shape != b.shape:
        raise GeometryError(
            f"cosine: {names[0]} has {a.numel()} entries and {names[1]} has {b.numel()}; they must be the same "
            "kind of object on the same modules (same d_model, layers, sites and rank for A/B)."
        )
    a64, b64 = a.double(), b.double()
    for name, v in zip(names, (a64, b64), strict=True):
        if not bool(torch.isfinite(v).all()):
            raise GeometryError(f"cosine: {name} has NaN or infinite entries; a cosine needs finite vectors.")
        if float(v.norm()) == 0.0:
            raise GeometryError(f"cosine: {name} is the zero vector (e.g. an untrained adapter with init='zeros'); "
                                "its cosine to anything is undefined.")
    return float(a64 @ b64) / float(a64.norm() * b64.norm())


def _check_same_modules(a: Any, b: Any, what: str) -> None:
    if what != "params" and isinstance(a, LoRA) and isinstance(b, LoRA) and a.modules() != b.modules():
        raise GeometryError(f"cosine: LoRAs on different modules ({a.modules()} vs {b.modules()}).")


def cosine(a: Any, b: Any, what: str = "delta_w") -> float:
    """Cosine similarity of two objects' vectors (see `as_flat`).

    Args:
        a: tensor, array, adapter, Direction or TrainRun.
        b: the same kind of object, of the same size.
        what: for LoRA, "delta_w" (default), "A", "B" or "params".

    Returns:
        cos ∈ [-1, 1], computed in float64.

    Raises:
        GeometryError: the vectors differ in size (e.g. different d_model or LoRA modules), or either
            is zero or non-finite.

    >>> cosine(general_vec, narrow_vec)  # doctest: +SKIP
    0.42
    """
    _check_same_modules(a, b, what)
    return _cos(as_flat(a, what), as_flat(b, what), ("a", "b"))


def _label(i: int, x: Any) -> str:
    if isinstance(x, TrainRun):
        return f"{i}:run"
    return f"{i}:{type(x).__name__}"


class CosineMatrix(NamedTuple):
    """`cosine_matrix`'s result; unpacks as `(labels, matrix)`.

    Attributes:
        labels: the n item names.
        matrix: [n, n] float64 cosines.
    """

    labels: list[str]
    matrix: Float[np.ndarray, "n n"]

    def __repr__(self) -> str:
        width = max((len(x) for x in self.labels), default=0)
        rows = [" " * width + "".join(f"{x[:8]:>9}" for x in self.labels)]
        rows += [f"{lab:<{width}}" + "".join(f"{v:>9.3f}" for v in row) for lab, row in zip(self.labels, self.matrix, strict=True)]
        return f"CosineMatrix({len(self.labels)}×{len(self.labels)})\n" + "\n".join(rows)

    def plot(self) -> Any:
        """A heatmap as a plotly Figure (`em_interp.report.figures.cosine_matrix`)."""
        from em_interp.report import figures

        return figures.cosine_matrix({"cosine_matrix": {"labels": self.labels, "matrix": self.matrix}})


def cosine_matrix(
    items: Sequence[Any] | Mapping[str, Any], labels: Sequence[str] | None = None, what: str = "delta_w"
) -> CosineMatrix:
    """Pairwise cosine similarities.

    Args:
        items: a list of objects accepted by `cosine`, or a mapping label -> object.
        labels: names for a list (default "0:SteeringVector", ...); ignored for a mapping.
        what: as in `cosine`.

    Returns:
        A `CosineMatrix` (unpacks as `(labels, matrix)`) with matrix[i, j] = cosine(items[i], items[j])
        (float64, diagonal 1); it prints as a table and `.plot()`s as a heatmap.

    Raises:
        GeometryError: items of different sizes, a zero item, or as many labels as items not given.
    """
    if isinstance(items, Mapping):
        names, objs = [str(k) for k in items], list(items.values())
    else:
        objs = list(items)
        names = [str(n) for n in labels] if labels is not None else [_label(i, x) for i, x in enumerate(objs)]
    if len(names) != len(objs):
        raise GeometryError(f"cosine_matrix: {len(names)} labels for {len(objs)} items.")
    vectors = [as_flat(x, what) for x in objs]
    n = len(vectors)
    out = np.eye(n)
    for i in range(n):
        for j in range(i, n):
            _check_same_modules(objs[i], objs[j], what)
            out[i, j] = out[j, i] = _cos(vectors[i], vectors[j], (names[i], names[j]))
    return CosineMatrix(names, out)
