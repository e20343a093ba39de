"""`loss_on`: mean cross-entropy of a model (with adapters) on chat data, fast when called repeatedly.

The geometry curves evaluate the same rows dozens of times with slightly different adapters. The blocks
below the adapters' first layer do not change between those calls, so their output residual is computed
once per (model, data, batch size, start layer) and kept in a private `ActivationCache`; each call then
runs only the upper blocks (`resume_forward`) and unembeds only the target positions.

The private cache holds the last `MAX_CACHED_DATASETS` datasets per model (weakly keyed on the model)
and assumes the model's weights do not change (they are frozen). When the caller has hooks attached to
the model already (e.g. inside `directions.steer(...)` or `adapter.applied(...)`), the cache is
bypassed and full forwards run, so those hooks always apply. `clear_loss_cache()` frees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from em_interp.adapters.base import Adapter
from em_interp.adapters.lora import LoRA
from em_interp.adapters.stack import check_stackable, stacked_hooks
from em_interp.adapters.steering import SteeringVector
from em_interp.datasets.records import Record
from em_interp.datasets.tokenize import ChatBatch, TokenizedChats
from em_interp.errors import GeometryError
from em_interp.interventions import Intervention, as_interventions, intervention_hooks
from em_interp.model.forward import ActivationCache, ForwardRunner, model_device, model_dtype, start_layer, unembed
from em_interp.model.hooks import HookFn, hooks_applied, model_has_hooks
from em_interp.positions import position_name
from em_interp.training.objective import gather_targets, prediction_mask, token_ce

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

MAX_CACHED_DATASETS = 4
STACK_TOKENS = {"cuda": 1 << 16, "cpu": 1 << 12}  # tokens per stacked forward of `loss_on_each` (rows × adapters)
GPU_CACHE_BYTES = 1 << 30  # residuals up to this size stay on the model's device; larger ones go to the CPU
_EVALUATORS: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], _Evaluator]] = weakref.WeakKeyDictionary()


def first_rows(data: Sequence[Record] | TokenizedChats, n_rows: int | None) -> Sequence[Record] | TokenizedChats:
    """The first `n_rows` examples of `data` (all when None or when there are fewer)."""
    if n_rows is None or len(data) <= n_rows:
        return data
    if isinstance(data, TokenizedChats):
        return TokenizedChats(data.records[:n_rows], data.tokenizer, max_length=data.max_length, on_too_long="skip")
    return list(data)[:n_rows]


class _Evaluator:
    """One dataset on one model: fixed batches and, per start layer, a `ForwardRunner` caching the residuals
    entering it (all runners share one `ActivationCache`)."""

    def __init__(self, model: TransformerBridge, data: TokenizedChats, batch_size: int, tokens: str):
        self.model, self.data, self.tokens = model, data, tokens
        self.device = model_device(model)
        self.batches: list[ChatBatch] = [data.collate(idx).to(self.device) for idx in data.batch_plan(batch_size)]
        n_tokens = sum(b.input_ids.numel() for b in self.batches)
        size = n_tokens * int(model.cfg.d_model) * torch.finfo(model_dtype(model)).bits // 8
        self.cache = ActivationCache(device=self.device if size <= GPU_CACHE_BYTES else "cpu")
        self._runners: dict[int, ForwardRunner] = {}

    def _runner(self, start: int) -> ForwardRunner:
        if start not in self._runners:
            self._runners[start] = ForwardRunner(self.model, start, cache=self.cache)
        return self._runners[start]

    def loss(self, hooks: list[tuple[str, HookFn]], start: int, cached: bool) -> float:
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        runner = self._runner(start)
        for k, batch in enumerate(self.batches):
            target = batch.target_mask(self.tokens)
            if cached:
                resid = runner.lower((k,), batch.input_ids, batch.attention_mask)
                with hooks_applied(self.model, hooks):
                    hidden = runner.resume(resid, batch.attention_mask)
                h, targets, _ = gather_targets(hidden, batch.input_ids, target)
                ce = token_ce(unembed(self.model, h), targets)
            else:
                with hooks_applied(self.model, hooks):
                    logits = runner.bridge_logits(batch.input_ids, batch.attention_mask)
                ce = token_ce(logits[prediction_mask(target)], batch.input_ids[target])
            total += ce.double().sum()
            count += ce.numel()
        if count == 0:
            raise GeometryError(f"loss_on: the data has no {self.tokens!r} target tokens.")
        return float(total) / count

    def losses_each(self, adapters: Sequence[Adapter], start: int) -> list[float]:
        """Each adapter's loss alone, several adapters per forward: the batch is repeated once per adapter and
        adapter i changes only its copy (`stacked_hooks`), so the numbers equal separate `loss` calls."""
        n = len(adapters)
        totals = torch.zeros(n, dtype=torch.float64, device=self.device)
        count = 0
        runner = self._runner(start)
        budget = STACK_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]
        for k, batch in enumerate(self.batches):
            target = batch.target_mask(self.tokens)
            resid = runner.lower((k,), batch.input_ids, batch.attention_mask)
            group = max(1, budget // max(1, batch.input_ids.numel()))
            for lo in range(0, n, group):
                chunk = adapters[lo : lo + group]
                g = len(chunk)
                owner = torch.arange(g, device=self.device).repeat_interleave(batch.input_ids.shape[0])
                mask = batch.attention_mask.repeat(g, 1)
                with hooks_applied(self.model, stacked_hooks(chunk, owner)):
                    hidden = runner.resume(resid.repeat(g, 1, 1), mask)
                h, targets, rows = gather_targets(hidden, batch.input_ids.repeat(g, 1), target.repeat(g, 1))
                ce = token_ce(unembed(self.model, h), targets).double()
                per_adapter = torch.zeros(g, dtype=torch.float64, device=ce.device)
                totals[lo : lo + g] += per_adapter.index_add_(0, owner.to(rows.device)[rows].to(ce.device), ce).to(self.device)
            count += int(target.sum())
        if count == 0:
            raise GeometryError(f"loss_on_each: the data has no {self.tokens!r} target tokens.")
        return (totals / count).tolist()


def _key(data: Sequence[Record] | TokenizedChats, max_length: int) -> tuple[Any, ...]:
    if isinstance(data, TokenizedChats):
        return ("tokenized", data.fingerprint())
    digest = hashlib.sha256(json.dumps([r["messages"] for r in data], sort_keys=True).encode()).hexdigest()[:16]
    return ("records", digest, max_length)


def _evaluator(
    model: TransformerBridge, data: Sequence[Record] | TokenizedChats, batch_size: int, tokens: str, max_length: int
) -> _Evaluator:
    per_model = _EVALUATORS.setdefault(model, OrderedDict())
    key = (*_key(data, max_length), batch_size, tokens)
    if key in per_model:
        per_model.move_to_end(key)
        return per_model[key]
    if not len(data):
        raise GeometryError("loss_on: data is empty.")
    tok = data if isinstance(data, TokenizedChats) else TokenizedChats(
        list(data), model.tokenizer, max_length=max_length, on_too_long="skip"
    )
    if len(tok) < len(data):
        log.warning("loss_on: %d of %d rows are longer than max_length=%d and were skipped.", len(data) - len(tok), len(data), max_length)
    per_model[key] = _Evaluator(model, tok, batch_size, tokens)
    while len(per_model) > MAX_CACHED_DATASETS:
        per_model.popitem(last=False)
    return per_model[key]


def clear_loss_cache(model: TransformerBridge | None = None) -> None:
    """Free the cached residuals of `loss_on` for `model` (None: for every model)."""
    if model is None:
        _EVALUATORS.clear()
    else:
        _EVALUATORS.pop(model, None)


def loss_on(
    model: TransformerBridge,
    data: Sequence[Record] | TokenizedChats,
    adapters: Intervention | Sequence[Intervention] | None = (),
    scale: float = 1.0,
    batch_size: int = 8,
    tokens: str = "answer",
    max_length: int = 512,
) -> float:
    """Mean cross-entropy over target tokens (token-weighted over the whole data), without gradients.

    Args:
        model: the TransformerBridge.
        data: chat records or `TokenizedChats`.
        adapters: interventions applied together (adapters, `Steering`, `Ablation`; none: the chat model itself).
        scale: multiplies each intervention's own `scale` (1.0: the adapter as trained; 0: no effect).
        batch_size: rows per forward.
        tokens: "answer" (the assistant's tokens, the default) or "all" non-pad tokens (see
            `em_interp.positions`; the old "assistant" still works, with a DeprecationWarning).
        max_length: rows longer than this (in tokens) are skipped, with a warning.

    Returns:
        Σ CE / number of target tokens, in nats.

    Raises:
        GeometryError: empty data, no target tokens, or a direction that does not fit the model.
        AdapterError: something that is not an intervention in `adapters`, or an adapter made for a model of
            another shape.

    >>> loss_on(model, data[:100], adapters=vec)  # doctest: +SKIP
    1.87
    """
    chosen = as_interventions(adapters)
    hooks = intervention_hooks(model, chosen, scale)  # checks each one fits the model before any forward
    tokens = position_name(tokens, ("answer", "all"), "loss_on: tokens", GeometryError)
    start = start_layer(model, chosen)
    cached = not model_has_hooks(model)
    evaluator = _evaluator(model, data, batch_size, tokens, max_length)
    with torch.no_grad():
        return evaluator.loss(hooks, start, cached)


def loss_on_each(
    model: TransformerBridge,
    data: Sequence[Record] | TokenizedChats,
    adapters: Sequence[Adapter],
    batch_size: int = 8,
    tokens: str = "answer",
    max_length: int = 512,
) -> list[float]:
    """`loss_on(model, data, a)` for each adapter `a` alone, evaluated several adapters per forward.

    The geometry curves score many variants of one adapter (rescaled, perturbed) on the same rows; stacking
    them along the batch (adapter i on its own copy of the rows, as `train_many` does) turns many small
    forwards into a few large ones — much faster on a GPU, the same arithmetic on a CPU.

    Args:
        model: the TransformerBridge.
        data: chat records or `TokenizedChats`.
        adapters: [n] adapters of one class and hook sites (values and `scale` may differ).
        batch_size: rows per batch before stacking.
        tokens: "answer" (the assistant's tokens, the default) or "all" non-pad tokens.
        max_length: rows longer than this (in tokens) are skipped, with a warning.

    Returns:
        [n] mean cross-entropies in nats, in the order of `adapters`.

    Raises:
        GeometryError: empty data, no target tokens, or an empty `adapters`.
        AdapterError: adapters of different classes or sites, or made for another model.
    """
    chosen = as_interventions(adapters)
    if not chosen:
        raise GeometryError("loss_on_each: no adapters given.")
    tokens = position_name(tokens, ("answer", "all"), "loss_on_each: tokens", GeometryError)
    stackable = [a for a in chosen if isinstance(a, (SteeringVector, LoRA))]
    if len(stackable) < len(chosen) or model_has_hooks(model):
        # a kind that cannot be stacked, or the caller's hooks must apply (full forwards): score one by one
        return [loss_on(model, data, a, batch_size=batch_size, tokens=tokens, max_length=max_length) for a in chosen]
    check_stackable(stackable)
    for a in stackable:
        a.check_model(model)
    evaluator = _evaluator(model, data, batch_size, tokens, max_length)
    with torch.no_grad():
        return evaluator.losses_each(stackable, start_layer(model, stackable))
