"""Directions in the residual stream: mean-difference extraction (`mean_diff`; mean, PCA, logistic).

Convention: `mean_diff(model, texts_a, texts_b, layer)` points **from a to b**: r = mean_b − mean_a,
normalised. Pass aligned answers as `texts_a` and misaligned answers as `texts_b` ("b" = misaligned), so
that `steer(model, d, +8)` pushes towards misalignment and `ablate(model, d)` removes it.

`em_interp.directions` gathers extraction, the interventions (`steer`, `ablate`, `Steering`, `Ablation`,
from `em_interp.interventions`) and `transfer`.

>>> d = mean_diff(model, aligned_records, misaligned_records, layer=15)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from em_interp.adapters.steering import STEERING_HOOKS
from em_interp.datasets.records import Record, chat
from em_interp.datasets.tokenize import ChatBatch, TokenizedChats
from em_interp.errors import DataError, GeometryError
from em_interp.interventions import Direction
from em_interp.model.forward import lower_forward, model_device
from em_interp.model.hooks import hooks_applied
from em_interp.positions import ALL, ANSWER, LAST, PROMPT

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

EXTRACT_POSITIONS = (ANSWER, PROMPT, ALL, LAST)  # the names of em_interp.positions, plus "last"
EXTRACT_METHODS = ("mean", "pca_diff", "pca_center", "logistic")
ReadPositions = str | int | Callable[[ChatBatch], Tensor]


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


def _check_read_positions(positions: Any) -> None:
    if isinstance(positions, str) and positions in EXTRACT_POSITIONS:
        return
    if isinstance(positions, int) and not isinstance(positions, bool):
        return
    if callable(positions) and not isinstance(positions, str):
        return
    raise GeometryError(
        f"mean_diff: positions={positions!r}; expected one of {', '.join(EXTRACT_POSITIONS)}, a token index (int), "
        "or a function batch -> Bool [batch, pos] mask."
    )


def _read_mask(batch: ChatBatch, positions: ReadPositions, name: str) -> Bool[Tensor, "batch pos"]:
    """Bool [batch, pos]: the tokens read in each row of a right-padded batch."""
    real = batch.attention_mask.bool()
    if isinstance(positions, str):
        if positions == "last":
            lengths = real.sum(1)
            return torch.nn.functional.one_hot(lengths - 1, real.shape[1]).bool()
        return {"answer": batch.assistant_mask, "all": real, "prompt": real & ~batch.assistant_mask}[positions]
    if isinstance(positions, int):
        lengths = real.sum(1)
        index = lengths + positions if positions < 0 else torch.full_like(lengths, positions)
        bad = ((index < 0) | (index >= lengths)).nonzero().flatten().tolist()
        if bad:
            row = batch.indices[bad[0]]
            raise DataError(f"mean_diff: positions={positions} is outside {name}[{row}] ({int(lengths[bad[0]])} tokens).")
        return torch.nn.functional.one_hot(index, real.shape[1]).bool()
    mask = positions(batch)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(real.shape):
        raise GeometryError(
            f"mean_diff: the positions function returned {type(mask).__name__} "
            f"{tuple(getattr(mask, 'shape', ()))}; expected a Bool tensor of shape {tuple(real.shape)} (the batch's input_ids)."
        )
    return mask.to(real.device) & real


def _row_activations(
    model: TransformerBridge, records: list[Record], name: str, layers: list[int], hook: str, positions: ReadPositions,
    batch_size: int, max_length: int,
) -> tuple[dict[int, Float[Tensor, "rows d_model"]], Int[Tensor, " rows"], int]:
    """({layer: Σ activations per row [rows, d_model] float64}, selected tokens per row [rows], rows skipped),
    rows in input order (those longer than max_length left out)."""
    tok = TokenizedChats(records, model.tokenizer, max_length=max_length, on_too_long="skip")
    skipped = len(records) - len(tok)
    if skipped:
        log.warning("mean_diff: %d rows of %s longer than max_length=%d skipped.", skipped, name, max_length)
    dev = model_device(model)
    stop = max(layers) + 1  # blocks above the highest hooked one need not run
    d_model = int(model.cfg.d_model)
    sums = {layer: torch.zeros(len(tok), d_model, dtype=torch.float64) for layer in layers}
    counts = torch.zeros(len(tok), dtype=torch.long)
    captured: dict[int, Tensor] = {}
    grabs = [(f"blocks.{layer}.{STEERING_HOOKS[hook]}", _grabber(captured, layer)) for layer in layers]
    for batch in tok.batches(batch_size):
        batch = batch.to(dev)
        mask = _read_mask(batch, positions, name)
        with torch.no_grad(), hooks_applied(model, grabs):
            lower_forward(model, batch.input_ids, stop, batch.attention_mask)
        rows = torch.tensor(batch.indices)
        weight = mask.to(torch.float64)
        for layer in layers:
            sums[layer][rows] = torch.einsum("bp,bpd->bd", weight, captured.pop(layer).double()).cpu()
        counts[rows] = mask.sum(1).cpu()
    return sums, counts, skipped


def _grabber(captured: dict[int, Tensor], layer: int) -> Any:
    def grab(act: Float[Tensor, "batch pos d_model"], hook: Any) -> None:
        captured[layer] = act

    return grab


def _fit(
    method: str, rows_a: Float[Tensor, "n_a d_model"], rows_b: Float[Tensor, "n_b d_model"]
) -> tuple[Float[Tensor, " d_model"], dict[str, Any]]:
    """A direction [d_model] from per-row activations (float64 [n, d_model]) pointing from a to b, and details."""
    a, b = rows_a.numpy(), rows_b.numpy()
    if method == "logistic":
        from sklearn.linear_model import LogisticRegression

        x, y = np.concatenate([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
        clf = LogisticRegression(max_iter=1000).fit(x, y)
        return torch.from_numpy(clf.coef_[0].copy()), {"train_accuracy": float(clf.score(x, y))}
    from sklearn.decomposition import PCA

    if method == "pca_diff":
        train = b - a
    else:  # pca_center: each pair centred on its midpoint
        center = (a + b) / 2
        train = np.concatenate([a - center, b - center])
    pca = PCA(n_components=1, whiten=False).fit(train)
    assert pca.components_ is not None  # set by fit
    direction = pca.components_[0].copy()
    higher = np.mean(b @ direction > a @ direction)  # repeng's sign rule: most pairs project higher on b
    if higher < np.mean(b @ direction < a @ direction):
        direction = -direction
    return torch.from_numpy(direction), {"explained_variance_ratio": float(pca.explained_variance_ratio_[0])}


@overload
def mean_diff(
    model: TransformerBridge, texts_a: Sequence[Any], texts_b: Sequence[Any], layer: int, positions: ReadPositions = ...,
    hook: str = ..., batch_size: int = ..., max_length: int = ..., method: str = ...,
) -> Direction: ...
@overload
def mean_diff(
    model: TransformerBridge, texts_a: Sequence[Any], texts_b: Sequence[Any], layer: Sequence[int], positions: ReadPositions = ...,
    hook: str = ..., batch_size: int = ..., max_length: int = ..., method: str = ...,
) -> dict[int, Direction]: ...
def mean_diff(
    model: TransformerBridge,
    texts_a: Sequence[Any],
    texts_b: Sequence[Any],
    layer: int | Sequence[int],
    positions: ReadPositions = "answer",
    hook: str = "resid_post",
    batch_size: int = 8,
    max_length: int = 512,
    method: str = "mean",
) -> Direction | dict[int, Direction]:
    """A unit direction from a to b (b = misaligned by convention), read at one or several layers.

    Args:
        model: the TransformerBridge.
        texts_a: chat records or (question, answer) pairs, e.g. aligned answers.
        texts_b: the same for the other side, e.g. misaligned answers.
        layer: a block index (negative counts from the end), or a list of them (one forward pass reads all).
        positions: which tokens of each row are read: "answer" (assistant tokens: each answer's content and its
            end-of-turn token), "prompt" (the other non-pad tokens), "all" (every non-pad token), "last" (the
            row's last token, as steering-vectors' default `read_token_index=-1` and repeng), an int (that token
            index of each row, negative from the end), or a function `batch -> Bool [batch, pos]` given each
            `ChatBatch` (right-padded; input_ids, attention_mask, assistant_mask), ANDed with the non-pad tokens.
        hook: where to read: "resid_post" (default), "resid_pre", "resid_mid", "mlp_out", "attn_out".
        batch_size: rows per forward.
        max_length: longer rows are skipped (with a warning; refused by the paired methods).
        method: "mean" (difference of the token-pooled means), "pca_diff" (first principal component of the
            paired row differences b_i − a_i, as repeng), "pca_center" (first principal component of each pair
            centred on its midpoint, as repeng), or "logistic" (scikit-learn `LogisticRegression()` weights
            separating a from b). The last three take one vector per row (the mean of its read tokens);
            the PCA methods pair a[i] with b[i] and orient the component so most pairs project higher on b.

    Returns:
        A unit `Direction` at (layer, hook) — a dict {layer: Direction} when `layer` is a list — with
        provenance (method, positions, n_a, n_b, n_tokens_a, n_tokens_b, model_id, raw_norm = ‖mean_b −
        mean_a‖, and explained_variance_ratio (PCA) or train_accuracy (logistic)).

    Raises:
        DataError: empty inputs, inputs of another form, no selected tokens, a row with no selected token
            (per-row methods), an index outside a row, or unpaired rows for the PCA methods.
        GeometryError: bad layer, hook, positions or method, or identical means.

    >>> d = mean_diff(model, aligned, misaligned, layer=15, positions="last", method="pca_diff")  # doctest: +SKIP
    """
    n_layers = int(model.cfg.n_layers)
    layers_in = [layer] if isinstance(layer, int) else list(layer)
    if not layers_in:
        raise GeometryError("mean_diff: layer=[]; expected a block index or a non-empty list of them.")
    for lyr in layers_in:
        if isinstance(lyr, bool) or not isinstance(lyr, int) or not -n_layers <= lyr < n_layers:
            raise GeometryError(f"mean_diff: layer={lyr!r} is out of range for a model with {n_layers} layers.")
    if hook not in STEERING_HOOKS:
        raise GeometryError(f"mean_diff: hook={hook!r}; expected one of {', '.join(STEERING_HOOKS)}.")
    _check_read_positions(positions)
    if method not in EXTRACT_METHODS:
        raise GeometryError(f"mean_diff: method={method!r}; expected one of {', '.join(EXTRACT_METHODS)}.")
    layers = sorted({lyr % n_layers for lyr in layers_in})
    sides = {}
    for name, texts in (("texts_a", texts_a), ("texts_b", texts_b)):
        records = _records(texts, name)
        sums, counts, skipped = _row_activations(model, records, name, layers, hook, positions, batch_size, max_length)
        if int(counts.sum()) == 0:
            raise DataError(f"mean_diff: {name} has no {_label(positions)!r} tokens.")
        if method != "mean":
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:
                raise DataError(f"mean_diff: {name}: kept row {empty[0]} has no {_label(positions)!r} tokens; "
                                f"method={method!r} needs one vector per row.")
            if method.startswith("pca") and skipped:
                raise DataError(f"mean_diff: method={method!r} pairs a[i] with b[i], but {skipped} rows of {name} "
                                f"exceed max_length={max_length}; raise it or drop those pairs.")
        sides[name] = (sums, counts, len(records) - skipped)
    (sums_a, count_a, n_a), (sums_b, count_b, n_b) = sides["texts_a"], sides["texts_b"]
    if method.startswith("pca") and n_a != n_b:
        raise DataError(f"mean_diff: method={method!r} pairs a[i] with b[i]; got {n_a} rows in texts_a and {n_b} in texts_b.")
    out = {}
    for lyr in layers:
        diff = sums_b[lyr].sum(0) / count_b.sum() - sums_a[lyr].sum(0) / count_a.sum()
        raw = float(diff.norm())
        if raw == 0.0:
            raise GeometryError(f"mean_diff: the two means are identical at layer {lyr}; there is no direction.")
        extra: dict[str, Any] = {}
        vector = diff
        if method != "mean":
            vector, extra = _fit(method, sums_a[lyr] / count_a[:, None], sums_b[lyr] / count_b[:, None])
        prov = {"method": "mean_diff" if method == "mean" else method, "positions": _label(positions), "n_a": n_a,
                "n_b": n_b, "n_tokens_a": int(count_a.sum()), "n_tokens_b": int(count_b.sum()),
                "model_id": getattr(model, "em_model_id", None), "raw_norm": raw, **extra}
        out[lyr] = Direction(vector.float(), lyr, hook, prov)
    return out[layers[0]] if isinstance(layer, int) else out


def _label(positions: ReadPositions) -> str | int:
    return positions if isinstance(positions, (str, int)) else "mask"


__all__ = ["EXTRACT_METHODS", "EXTRACT_POSITIONS", "ReadPositions", "mean_diff"]
