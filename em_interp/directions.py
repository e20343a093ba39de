"""Directions in the residual stream: mean-difference extraction, steering, ablation and transfer.

Convention: `mean_diff(model, texts_a, texts_b, layer)` points **from a to b**: r = mean_b − mean_a,
normalised. Pass aligned answers as `texts_a` and misaligned answers as `texts_b` ("b" = misaligned), so
that `steer(model, d, +8)` pushes towards misalignment and `ablate(model, d)` removes it.

>>> d = mean_diff(model, aligned_records, misaligned_records, layer=15)  # doctest: +SKIP
>>> with ablate(model, d, layers="all"):  # doctest: +SKIP
...     text = em.generate(model, prompts)

`Direction` (a unit vector with layer, hook and provenance; `save`/`load`) is defined in
`em_interp.geometry.direction` and re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.steering import STEERING_HOOKS
from em_interp.datasets.records import Record, chat
from em_interp.datasets.tokenize import TokenizedChats
from em_interp.errors import DataError, GeometryError
from em_interp.geometry.direction import Direction, as_direction, check_fits
from em_interp.geometry.loss import as_adapters, loss_on
from em_interp.hooks import Positions, check_positions, hooks_applied, position_weight
from em_interp.models import model_device

log = logging.getLogger(__name__)

EXTRACT_POSITIONS = ("answer", "prompt", "all")


# --- extraction ---------------------------------------------------------------------------------
def _records(texts: Sequence[Any], name: str) -> list[Record]:
    out: list[Record] = []
    for i, t in enumerate(texts):
        if isinstance(t, dict) and "messages" in t:
            out.append(t)
        elif isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(s, str) for s in t):
            out.append(chat(t[0], t[1]))
        else:
            raise DataError(f"{name}[{i}] is a {type(t).__name__}; expected a chat record or a (question, answer) pair.")
    if not out:
        raise DataError(f"{name} is empty.")
    return out


def _activation_sum(
    model: Any, records: list[Record], layer: int, hook_name: str, positions: str, batch_size: int, max_length: int
) -> tuple[Tensor, int, int]:
    """(Σ activations [d_model] float64, token count, rows used) at `hook_name` over the chosen tokens."""
    tok = TokenizedChats(records, model.tokenizer, max_length=max_length, on_too_long="skip")
    if len(tok) < len(records):
        log.warning("mean_diff: %d rows longer than max_length=%d skipped.", len(records) - len(tok), max_length)
    dev = model_device(model)
    stop = layer + 1 if layer + 1 < int(model.cfg.n_layers) else None
    total = torch.zeros(int(model.cfg.d_model), dtype=torch.float64, device=dev)
    count = 0
    captured: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any) -> None:
        captured["act"] = act

    for batch in tok.batches(batch_size):
        batch = batch.to(dev)
        with torch.no_grad(), hooks_applied(model, [(hook_name, grab)]):
            model(batch.input_ids, attention_mask=batch.attention_mask, stop_at_layer=stop)
        real = batch.attention_mask.bool()
        mask = {"answer": batch.assistant_mask, "all": real, "prompt": real & ~batch.assistant_mask}[positions]
        acts = captured.pop("act")[mask.to(dev)]
        total += acts.double().sum(0)
        count += acts.shape[0]
    return total, count, len(tok)


def mean_diff(
    model: Any,
    texts_a: Sequence[Any],
    texts_b: Sequence[Any],
    layer: int,
    positions: str = "answer",
    hook: str = "resid_post",
    batch_size: int = 8,
    max_length: int = 512,
) -> Direction:
    """The normalised difference of mean activations, pointing from a to b (b = misaligned by convention).

    Args:
        model: the TransformerBridge.
        texts_a: chat records or (question, answer) pairs, e.g. aligned answers.
        texts_b: the same for the other side, e.g. misaligned answers.
        layer: block index (negative counts from the end).
        positions: "answer" (assistant tokens: each answer's content and its end-of-turn token),
            "prompt" (the other non-pad tokens) or "all" (every non-pad token).
        hook: where to read: "resid_post" (default), "resid_pre", "resid_mid", "mlp_out", "attn_out".
        batch_size: rows per forward.
        max_length: longer rows are skipped (with a warning).

    Returns:
        A unit `Direction` at (layer, hook) with provenance (method, positions, n_a, n_b, model_id,
        raw_norm = ‖mean_b − mean_a‖, n_tokens_a, n_tokens_b).

    Raises:
        DataError: empty inputs, inputs of another form, or no selected tokens.
        GeometryError: bad layer, hook or positions, or identical means.
    """
    n_layers = int(model.cfg.n_layers)
    if not -n_layers <= layer < n_layers:
        raise GeometryError(f"mean_diff: layer={layer} is out of range for a model with {n_layers} layers.")
    if hook not in STEERING_HOOKS:
        raise GeometryError(f"mean_diff: hook={hook!r}; expected one of {', '.join(STEERING_HOOKS)}.")
    if positions not in EXTRACT_POSITIONS:
        raise GeometryError(f"mean_diff: positions={positions!r}; expected one of {', '.join(EXTRACT_POSITIONS)}.")
    layer = layer % n_layers
    hook_name = f"blocks.{layer}.{STEERING_HOOKS[hook]}"
    sums = []
    for name, texts in (("texts_a", texts_a), ("texts_b", texts_b)):
        total, count, rows = _activation_sum(model, _records(texts, name), layer, hook_name, positions, batch_size, max_length)
        if count == 0:
            raise DataError(f"mean_diff: {name} has no {positions!r} tokens.")
        sums.append((total / count, count, rows))
    (mean_a, tok_a, n_a), (mean_b, tok_b, n_b) = sums
    diff = (mean_b - mean_a).float().cpu()
    raw = float(diff.norm())
    if raw == 0.0:
        raise GeometryError("mean_diff: the two means are identical; there is no direction.")
    prov = {"method": "mean_diff", "positions": positions, "n_a": n_a, "n_b": n_b, "n_tokens_a": tok_a,
            "n_tokens_b": tok_b, "model_id": getattr(model, "em_model_id", None), "raw_norm": raw}
    return Direction(diff, layer, hook, prov)


# --- interventions ------------------------------------------------------------------------------
@contextlib.contextmanager
def steer(model: Any, direction: Direction | Adapter, scale: float, positions: Positions = "all") -> Iterator[Direction]:
    """Context manager adding `scale · r̂` at the direction's hook (its layer); removed on exit.

    Args:
        model: the TransformerBridge.
        direction: a Direction (or a SteeringVector / rank-1 LoRA, see `as_direction`).
        scale: the norm of the added vector (the authors steer with 8 for mean-diff directions).
        positions: "all", an int k (tokens at position >= k) or a Bool [batch, pos] mask.
    """
    d = as_direction(direction)
    check_fits(d, model, "steer")
    check_positions(positions)
    unit = d.vector

    def add(act: Tensor, hook: Any) -> Tensor:
        delta = (unit * float(scale)).to(act.device, act.dtype)
        weight = position_weight(positions, act)
        return act + (delta if weight is None else weight * delta)

    with hooks_applied(model, [(d.hook_name, add)]):
        yield d


def ablation_hooks(model: Any, direction: Direction, layers: str | Sequence[int] = "all") -> list[str]:
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
def ablate(
    model: Any, direction: Direction | Adapter, layers: str | Sequence[int] = "all", positions: Positions = "all"
) -> Iterator[Direction]:
    """Context manager projecting r̂ out of the residual stream: h ← h − (h·r̂) r̂.

    With `layers="all"` the projection is applied to the embeddings (`blocks.0.hook_resid_pre`) and
    after every block (`hook_resid_post`), so no block ever reads the direction. The authors add
    −(h·r̂)r̂ to every layer's *output* only; pass `layers=range(n_layers)` for exactly that. The
    projection is computed in float32.

    Args:
        model: the TransformerBridge.
        direction: a Direction (or SteeringVector / rank-1 LoRA, see `as_direction`).
        layers: "all" or block indices.
        positions: "all", an int k or a Bool [batch, pos] mask.
    """
    d = as_direction(direction)
    check_fits(d, model, "ablate")
    check_positions(positions)
    unit = d.vector

    def project(act: Tensor, hook: Any) -> Tensor:
        u = unit.to(act.device)
        removed = (act.float() @ u).unsqueeze(-1) * u
        weight = position_weight(positions, act)
        return act - (removed if weight is None else weight.float() * removed).to(act.dtype)

    with hooks_applied(model, [(name, project) for name in ablation_hooks(model, d, layers)]):
        yield d


@dataclass
class Steering:
    """`steer` as an object with `.applied(model)`, to pass among adapters (`em.generate`, `eval.contrastive`).

    `applied(model, scale=s)` adds `s · scale · r̂` (s multiplies, as for an adapter's scale).
    """

    direction: Direction
    scale: float
    positions: Positions = "all"

    def applied(self, model: Any, scale: float | None = None, positions: Positions | None = None) -> Any:
        factor = 1.0 if scale is None else float(scale)
        return steer(model, self.direction, factor * self.scale, self.positions if positions is None else positions)

    def __repr__(self) -> str:
        return f"Steering({self.direction.hook_name}, scale={self.scale:g})"


@dataclass
class Ablation:
    """`ablate` as an object with `.applied(model)`, to pass among adapters; a `scale` passed in is ignored."""

    direction: Direction
    layers: str | Sequence[int] = "all"
    positions: Positions = "all"

    def applied(self, model: Any, scale: float | None = None, positions: Positions | None = None) -> Any:
        return ablate(model, self.direction, self.layers, self.positions if positions is None else positions)

    def __repr__(self) -> str:
        return f"Ablation(layers={self.layers!r}, d_model={self.direction.d_model})"


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


def _contrastive_fn() -> Any:
    try:
        from em_interp.eval.contrastive import contrastive
    except ImportError:
        log.info("transfer: em_interp.eval.contrastive is not available; the contrastive metric is skipped.")
        return None
    return contrastive


def transfer(
    direction: Direction | Adapter,
    to: Any,
    data: Sequence[Any],
    *,
    model: Any = None,
    adapters: Adapter | Sequence[Adapter] | None = (),
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
        adapters: further adapters applied on the target in every condition.
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
    chosen = as_adapters(adapters)
    if isinstance(to, Adapter):
        if model is None:
            raise GeometryError("transfer: `to` is an adapter; pass the model it applies to as model=...")
        chosen = [to, *chosen]
    else:
        model = to
    check_fits(d, model, "transfer")
    rows = list(data)[:n_rows] if n_rows is not None else list(data)
    if not rows:
        raise DataError("transfer: data is empty.")
    paired = all(isinstance(r, dict) and "messages" not in r and {"question", "good", "bad"} <= set(r) for r in rows)
    bad = [chat(r["question"], r["bad"]) for r in rows] if paired else _records(rows, "data")
    good = [chat(r["question"], r["good"]) for r in rows] if paired else None
    contrastive = _contrastive_fn() if paired else None
    conditions: dict[str, Any] = {"none": None, "steered": Steering(d, scale, positions), "ablated": Ablation(d, layers, positions)}
    loss, loss_good, contrast = {}, {}, {}
    for name, intervention in conditions.items():
        with contextlib.nullcontext() if intervention is None else intervention.applied(model):
            loss[name] = loss_on(model, bad, chosen, batch_size=batch_size)
            if good is not None:
                loss_good[name] = loss_on(model, good, chosen, batch_size=batch_size)
        if contrastive is not None:
            extra = [] if intervention is None else [intervention]
            contrast[name] = contrastive(model, rows, adapters=[*chosen, *extra], batch_size=batch_size, progress=False)
    return TransferResult(
        loss=loss, loss_good=loss_good if paired else None, contrastive=contrast if contrastive is not None else None,
        direction=d, scale=float(scale), layers=layers if isinstance(layers, str) else [int(x) for x in layers],
    )


__all__ = [
    "EXTRACT_POSITIONS", "Ablation", "Direction", "Steering", "TransferResult", "ablate", "ablation_hooks", "as_direction", "mean_diff", "steer",
    "transfer",
]
