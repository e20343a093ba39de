"""Directions in the residual stream: mean-difference extraction, steering, ablation and transfer.

Convention: `mean_diff(model, texts_a, texts_b, layer)` points **from a to b**: r = mean_b − mean_a,
normalised. Pass aligned answers as `texts_a` and misaligned answers as `texts_b` ("b" = misaligned), so
that `steer(model, d, +8)` pushes towards misalignment and `ablate(model, d)` removes it.

>>> d = mean_diff(model, aligned_records, misaligned_records, layer=15)  # doctest: +SKIP
>>> with ablate(model, d, layers="all"):  # doctest: +SKIP
...     text = em.generate(model, prompts)

`mean_diff` is defined in `em_interp.geometry.directions`; `Direction` (a unit vector with layer, hook and
provenance; `save`/`load`), `steer`, `ablate`, `Steering` and `Ablation` in `em_interp.interventions` (one
protocol with the adapters). All are re-exported here, next to `transfer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from em_interp.adapters.base import Adapter
from em_interp.datasets.records import chat
from em_interp.errors import DataError, GeometryError
from em_interp.eval.contrastive import contrastive as _contrastive
from em_interp.geometry.directions import EXTRACT_METHODS, EXTRACT_POSITIONS, _records, mean_diff
from em_interp.geometry.loss import loss_on
from em_interp.interventions import (
    Ablation,
    Direction,
    Steering,
    ablate,
    ablation_hooks,
    as_direction,
    as_interventions,
    check_fits,
    steer,
)
from em_interp.model.hooks import Positions

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


# --- transfer -----------------------------------------------------------------------------------
@dataclass
class TransferResult:
    """A direction's effect on a model, under three conditions: "none", "steered" and "ablated".

    Attributes:
        loss: condition -> mean assistant-token CE on the chat data (the "bad" answers for paired data).
        loss_good: condition -> CE on the "good" answers (paired data only, else None).
        contrastive: condition -> `eval.contrastive` result (paired data, when that module exists): its
            base pass is the plain target model, its adapted pass has the target's adapters plus the
            condition's intervention (`Steering` / `Ablation`), so `mean_shift` is the total effect.
        direction: the direction used; scale: the steering norm; layers: the ablated layers.
    """

    loss: dict[str, float]
    loss_good: dict[str, float] | None
    contrastive: dict[str, Any] | None
    direction: Direction
    scale: float
    layers: str | list[int]

    def __repr__(self) -> str:
        loss = ", ".join(f"{k} {v:.4f}" for k, v in self.loss.items())
        text = f"TransferResult({self.direction.hook_name}, scale={self.scale:g}, layers={self.layers!r})\n  loss: {loss}"
        shift = self.contrastive_shift()
        if shift is not None:
            text += "\n  contrastive shift: " + ", ".join(f"{k} {v:+.3f}" for k, v in shift.items())
        return text

    def loss_shift(self) -> dict[str, float]:
        """Loss change against the "none" condition."""
        return {k: v - self.loss["none"] for k, v in self.loss.items()}

    def contrastive_shift(self) -> dict[str, float] | None:
        """Mean contrastive shift over all items per condition (None without the contrastive metric)."""
        if self.contrastive is None:
            return None
        return {k: float(r.domains["all"]["mean_shift"]) for k, r in self.contrastive.items()}


def transfer(
    direction: Direction | Adapter,
    to: Any,
    data: Sequence[Any],
    *,
    model: TransformerBridge | None = None,
    adapters: Any = (),
    scale: float = 8.0,
    layers: str | Sequence[int] = "all",
    positions: Positions = "all",
    n_rows: int | None = None,
    batch_size: int = 8,
) -> TransferResult:
    """Measure a direction from one model or adapter on another: no intervention, steered, ablated.

    Args:
        direction: a Direction, or an adapter to take one from (SteeringVector: its vector).
        to: the target model, or an Adapter (then `model` is required and the adapter is applied).
        data: chat records (loss on their answers) or paired items (dicts with "question", "good",
            "bad": loss on bad and good answers, plus `eval.contrastive` when it exists).
        model: the model when `to` is an adapter.
        adapters: further interventions (adapters, `Steering`, `Ablation`) applied on the target in every condition.
        scale: the steering norm (the authors use 8).
        layers: layers ablated ("all" or indices, see `ablate`).
        positions: token positions steered / ablated.
        n_rows: use the first n rows of data (None: all).
        batch_size: rows per forward.

    Returns:
        A `TransferResult`.

    Raises:
        GeometryError: the direction's d_model (or layer) does not fit the target model, or `to` is an
            adapter without `model`.
    """
    d = as_direction(direction)
    chosen = as_interventions(adapters)
    if isinstance(to, Adapter):
        if model is None:
            raise GeometryError("transfer: `to` is an adapter; pass the model it applies to as model=...")
        chosen = [to, *chosen]
        target: TransformerBridge = model
    else:
        target = to
    check_fits(d, target, "transfer")
    rows = list(data)[:n_rows] if n_rows is not None else list(data)
    if not rows:
        raise DataError("transfer: data is empty.")
    paired = all(isinstance(r, dict) and "messages" not in r and {"question", "good", "bad"} <= set(r) for r in rows)
    bad = [chat(r["question"], r["bad"]) for r in rows] if paired else _records(rows, "data")
    good = [chat(r["question"], r["good"]) for r in rows] if paired else None
    contrastive = _contrastive if paired else None
    conditions: dict[str, Any] = {"none": None, "steered": Steering(d, scale, positions), "ablated": Ablation(d, layers, positions)}
    loss, loss_good, contrast = {}, {}, {}
    for name, intervention in conditions.items():
        with contextlib.nullcontext() if intervention is None else intervention.applied(target):
            loss[name] = loss_on(target, bad, chosen, batch_size=batch_size)
            if good is not None:
                loss_good[name] = loss_on(target, good, chosen, batch_size=batch_size)
        if contrastive is not None:
            extra = [] if intervention is None else [intervention]
            contrast[name] = contrastive(target, rows, adapters=[*chosen, *extra], batch_size=batch_size, progress=False)
    return TransferResult(
        loss=loss, loss_good=loss_good if paired else None, contrastive=contrast if contrastive is not None else None,
        direction=d, scale=float(scale), layers=layers if isinstance(layers, str) else [int(x) for x in layers],
    )


__all__ = [
    "EXTRACT_METHODS", "EXTRACT_POSITIONS", "Ablation", "Direction", "Steering", "TransferResult", "ablate", "ablation_hooks", "as_direction", "mean_diff", "steer",
    "transfer",
]
