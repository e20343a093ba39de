"""Loss computation for training: the fast "cached" method and the authors' methods "toggle" and
"precomputed_reference".

"toggle" (the authors' steering-vector trainer): per step a steered forward over the whole model on the
train batch, a steered forward on the KL batch and an unsteered no-grad forward on the KL batch, with
full-vocabulary log-softmax at every position. "precomputed_reference" (the authors' KL-LoRA trainer):
the same, except that the unsteered log-probs of each KL batch are computed once (all positions, full
vocabulary) and reused. Both run through the plain HF modules where the fast path applies (SDPA attention,
as the authors' code runs), through the bridge otherwise.

"cached" does the same loss with less work:
- the blocks below the adapter's first layer run once per batch, without grad; their output residual
  is cached (`ActivationCache`, shared across epochs and across runs that share data and layer), and the
  forward resumes from it (`em_interp.model.forward.ForwardRunner`);
- the chat model's reference log-probs on the KL data are computed once, only at the KL positions;
- the unembedding runs only at positions that enter a loss;
- the CE and KL batches run through the upper blocks as one forward when that pads them little
  (`MERGE_PADDING`): half the kernel launches, which is what a small model on a GPU waits for;
- an adapter whose KL coefficient is 0 (the general one of a study pair) gets its KL in a no-grad forward of its
  own: logged, but the backward skips its KL rows;
- the positions, targets and row owners are worked out on the host from the batch masks and copied through
  pinned memory, so a step queues its whole forward and backward without waiting for the device;
- hook-free bridge components run as plain HF modules (SDPA attention, `em_interp.model.fastpath`), and a host
  cache of an accelerator model is pinned and copied without blocking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from em_interp.adapters.base import Adapter
from em_interp.adapters.stack import stacked_hooks
from em_interp.config import METHODS
from em_interp.datasets.tokenize import ChatBatch, TokenizedChats
from em_interp.model import fastpath
from em_interp.model.forward import ActivationCache, ForwardRunner, full_hidden, hf_model_of, unembed
from em_interp.model.hooks import hooks_applied
from em_interp.training.objective import compiled, group_mean, log_probs, prediction_mask, reduce_kl, token_ce, token_kl

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["METHODS", "MERGE_PADDING", "ActivationCache", "LossComputer"]

# The CE and KL batches share a forward when padding them to one width adds at most this fraction of tokens, by
# device type: on a GPU a small model waits for kernel launches, which the merge halves; a CPU computes every
# padded token, so there only equal widths merge.
MERGE_PADDING = {"cuda": 0.1, "cpu": 0.0}


class _Part(NamedTuple):
    """Batches of one kind in a forward: `which` ("train" or "kl") batch `keys[j]` for adapter `owners[j]`, with
    its loss at `tokens` positions."""

    which: str
    keys: Sequence[int]
    tokens: str
    owners: Sequence[int]


class LossComputer:
    """Computes per-adapter CE and KL for one step (several adapters = disjoint rows of one batch).

    Args:
        model: the TransformerBridge (frozen).
        data: the CE data; kl_data: the KL data (None: no KL term).
        batch_size: rows per CE batch; kl_batch_size: rows per KL batch.
        start_layer: the lowest block any adapter touches (the cached method resumes there).
        ce_tokens: "answer" or "all" (see `em_interp.positions`); kl_tokens: the same for the KL positions.
        kl_reduction: see `em_interp.training.objective`.
        method: one of `METHODS` (see the module docstring).
        cache: an `ActivationCache` shared across runs (default: a new one).
    """

    def __init__(
        self,
        model: TransformerBridge,
        data: TokenizedChats,
        kl_data: TokenizedChats | None,
        *,
        batch_size: int,
        kl_batch_size: int,
        start_layer: int,
        ce_tokens: str = "answer",
        kl_tokens: str = "answer",
        kl_reduction: str = "token_mean",
        method: str = "cached",
        cache: ActivationCache | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; expected one of {', '.join(METHODS)}.")
        self.model = model
        self.runner = ForwardRunner(model, start_layer, cache=cache)
        self.device, self.start, self.cache = self.runner.device, self.runner.start, self.runner.cache
        self.data, self.kl_data = data, kl_data
        self.plan = data.batch_plan(batch_size)
        self.kl_plan = kl_data.batch_plan(kl_batch_size) if kl_data is not None else []
        self.ce_tokens, self.kl_tokens, self.kl_reduction = ce_tokens, kl_tokens, kl_reduction
        self.method = method
        self.vocab = int(model.cfg.d_vocab)
        self._host: dict[tuple[str, int], ChatBatch] = {}
        self._device: dict[tuple[str, int], ChatBatch] = {}
        self._full_refs: dict[int, Tensor] = {}  # "precomputed_reference": log-probs of each KL batch
        # Hashing the data and rebuilding the bridge's alias table (`hook_dict`, ~5 ms on a 48-block model)
        # are done once here, not at every step: both would leave the device idle at each step's start.
        self._fingerprint = {"train": data.fingerprint(), "kl": kl_data.fingerprint() if kl_data is not None else ""}
        self._hooks_view = _HookView(model)
        # compiled with the model's layers (big models on a GPU): the loss over a large vocabulary is then fused
        fuse = self.runner.fast and fastpath.compiles(hf_model_of(model).model, model)  # the root the layers compile under
        self._ce: Callable[..., Tensor] = compiled(token_ce) if fuse else token_ce
        self._kl: Callable[..., Tensor] = compiled(token_kl) if fuse else token_kl
        self._log_probs: Callable[..., Tensor] = compiled(log_probs) if fuse else log_probs

    # --- caches --------------------------------------------------------------------------------
    def _host_batch(self, which: str, k: int) -> ChatBatch:
        """Batch k of the train or KL plan, collated once (host memory)."""
        key = (which, k)
        if key not in self._host:
            data, plan = (self.data, self.plan) if which == "train" else (self.kl_data, self.kl_plan)
            assert data is not None
            self._host[key] = data.collate(plan[k])
        return self._host[key]

    def _batch(self, which: str, k: int) -> ChatBatch:
        """Batch k on the model's device (kept: a few integer tensors per batch)."""
        key = (which, k)
        if key not in self._device:
            host = self._host_batch(which, k)
            dev = self.device
            self._device[key] = ChatBatch(_to_device(host.input_ids, dev), _to_device(host.attention_mask, dev),
                                          _to_device(host.assistant_mask, dev), host.indices)
        return self._device[key]

    def _key(self, which: str, k: int) -> tuple[Any, ...]:
        return (self._fingerprint[which], len(self.plan[0] if which == "train" else self.kl_plan[0]), k)

    def _residual(self, which: str, k: int) -> Float[Tensor, "batch pos d_model"]:
        batch = self._batch(which, k)
        return self.runner.lower(self._key(which, k), batch.input_ids, self._mask([self._host_batch(which, k)], batch.attention_mask))

    def _reference(self, k: int) -> Float[Tensor, "n d_vocab"]:
        """Reference log-probs [n, vocab] at KL batch k's KL positions (computed once, see `ForwardRunner.reference`)."""
        host = self._host_batch("kl", k)
        index, _, _ = self._targets([host], host.input_ids.shape[1], self.kl_tokens, self.device)
        attn = self._mask([host], self._batch("kl", k).attention_mask)
        return self.runner.reference((*self._key("kl", k), self.kl_tokens), self._residual("kl", k), attn, index)

    # --- losses --------------------------------------------------------------------------------
    def losses(
        self, adapters: Sequence[Adapter], train_keys: Sequence[int], kl_keys: Sequence[int] | None,
        kl_grad: Sequence[bool] | None = None,
    ) -> tuple[Float[Tensor, " n_adapters"], Float[Tensor, " n_adapters"]]:
        """CE [N] and KL [N] (zeros without KL data) for adapters[i] on batch train_keys[i] / kl_keys[i].

        `kl_grad[i]` False (an adapter whose KL coefficient is 0) computes adapter i's KL without a gradient, in a
        forward of its own: its value is logged, and the backward skips its KL rows (default: all True)."""
        n = len(adapters)
        if self.method != "cached":
            if n != 1:
                raise ValueError(f"the {self.method} method trains one adapter at a time")
            return self._full_forwards(adapters[0], train_keys[0], None if kl_keys is None else kl_keys[0])
        everyone = list(range(n))
        parts = [_Part("train", train_keys, self.ce_tokens, everyone)]
        with_kl, kl_of = ([], []) if kl_keys is None else (everyone, kl_keys)
        graded = [i for i in with_kl if kl_grad is None or kl_grad[i]]
        plain = [i for i in with_kl if i not in graded]
        if graded:
            parts.append(_Part("kl", [kl_of[i] for i in graded], self.kl_tokens, graded))
        groups = [parts] if self._worth_merging(parts) else [[part] for part in parts]
        out = [result for group in groups for result in self._adapted_logits(adapters, group)]
        if plain:
            with torch.no_grad():
                out += self._adapted_logits(adapters, [_Part("kl", [kl_of[i] for i in plain], self.kl_tokens, plain)])
        logits, targets, owner = out[0]
        ce = group_mean(self._ce(logits, targets), owner, n)
        if not with_kl:
            return ce, torch.zeros_like(ce)
        refs = _cat([self._reference(kl_of[i]) for i in graded + plain])  # the KL rows' order in out[1:]
        logits, owner = _cat([o[0] for o in out[1:]]), _cat([o[2] for o in out[1:]])
        kl = reduce_kl(self._kl(refs, logits), owner, n, self.kl_reduction, self.vocab)
        return ce, kl

    def _worth_merging(self, parts: list[_Part]) -> bool:
        """Whether the CE and KL batches run as one forward: it halves the kernels launched per step (what a
        small model on a GPU waits for), at the cost of padding the narrower part's rows to the wider part's
        width; merged when that adds at most `MERGE_PADDING[device type]` to the tokens the separate forwards run."""
        if len(parts) < 2:
            return False
        sizes = [[self._host_batch(p.which, k).input_ids.shape for k in p.keys] for p in parts]
        rows = [sum(shape[0] for shape in part) for part in sizes]
        widths = [max(shape[1] for shape in part) for part in sizes]
        separate = sum(r * w for r, w in zip(rows, widths, strict=True))
        return sum(rows) * max(widths) <= (1 + MERGE_PADDING.get(self.device.type, 0.0)) * separate

    def _mask(self, host: list[ChatBatch], mask: Tensor) -> Tensor | None:
        """The attention mask to pass on: None on the fast path when no row is padded (checked on the host),
        so HF's mask code neither builds a mask nor waits for the device to inspect it."""
        if self.runner.fast and all(bool(b.attention_mask.all()) for b in host):
            return None
        return mask

    def _targets(
        self, batches: list[ChatBatch], width: int, tokens: str, device: torch.device
    ) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
        """Flat indices of the prediction positions in the stacked [rows × width] batch, their target ids
        and their row numbers — worked out on the host (no device sync), moved to `device`."""
        mask = torch.cat([_pad(b.target_mask(tokens), width, False) for b in batches])
        ids = torch.cat([_pad(b.input_ids, width, 0) for b in batches])
        pred = prediction_mask(mask)
        index = pred.flatten().nonzero().squeeze(1)
        rows = torch.div(index, width, rounding_mode="floor")
        return _to_device(index, device), _to_device(ids[mask], device), _to_device(rows, device)

    def _adapted_logits(
        self, adapters: Sequence[Adapter], parts: list[_Part]
    ) -> list[tuple[Float[Tensor, "n d_vocab"], Int[Tensor, " n"], Int[Tensor, " n"]]]:
        """One forward over the stacked batches of every part, adapter `part.owners[j]` on batch `part.keys[j]`'s
        rows; per part, the logits at its target positions, the targets and each position's adapter."""
        host = [[self._host_batch(p.which, k) for k in p.keys] for p in parts]
        flat = [b for batches in host for b in batches]
        width = max(b.input_ids.shape[1] for b in flat)
        attn = torch.cat([_pad(self._batch(p.which, k).attention_mask, width, 0) for p in parts for k in p.keys])
        resid = [_pad(self._residual(p.which, k), width, 0.0) for p in parts for k in p.keys]
        res = _cat(resid)
        sizes = [b.input_ids.shape[0] for b in flat]
        adapter_of = [i for p in parts for i in p.owners]  # batch j's adapter
        owner = _to_device(torch.repeat_interleave(torch.tensor(adapter_of), torch.tensor(sizes)), self.device)
        hooks = adapters[0].scaled_hooks(adapters[0].scale) if len(adapters) == 1 else stacked_hooks(adapters, owner)
        with hooks_applied(self._hooks_view, hooks):
            hidden = self.runner.resume(res, self._mask(flat, attn))
        dev = hidden.device  # the last block's device when the model is spread over several
        out, first_row = [], 0
        for batches, part in zip(host, parts, strict=True):
            index, targets, rows = self._targets(batches, width, part.tokens, self.device)
            index, rows = index + first_row * width, rows + first_row
            out.append((self.runner.logits_at(hidden, index), targets, owner[rows].to(dev)))
            first_row += sum(b.input_ids.shape[0] for b in batches)
        return out

    def _full_log_probs(self, batch: ChatBatch) -> Float[Tensor, "batch pos d_vocab"]:
        """float32 log-probs at every position of a forward through the whole model (hooks attached now fire)."""
        return self._log_probs(unembed(self.model, full_hidden(self.model, batch.input_ids, batch.attention_mask, fast=self.runner.fast)))

    def _full_forwards(self, adapter: Adapter, k: int, kl_k: int | None) -> tuple[Tensor, Tensor]:
        """The authors' step: full forwards, full-vocabulary log-softmax at every position."""
        batch = self._batch("train", k)
        hooks = adapter.scaled_hooks(adapter.scale)
        with hooks_applied(self._hooks_view, hooks):
            logp = self._full_log_probs(batch)
        mask = batch.target_mask(self.ce_tokens).to(logp.device)  # logits sit on the last block's device
        pred, targets = prediction_mask(mask), batch.input_ids.to(logp.device)[mask]
        ce = -logp[pred].gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean().reshape(1)
        if kl_k is None:
            return ce, torch.zeros_like(ce)
        kl_batch = self._batch("kl", kl_k)
        with hooks_applied(self._hooks_view, hooks):
            logp = self._full_log_probs(kl_batch)
        if self.method == "precomputed_reference":
            if kl_k not in self._full_refs:
                with torch.no_grad():
                    self._full_refs[kl_k] = self._full_log_probs(kl_batch)
            ref = self._full_refs[kl_k]
        else:
            with torch.no_grad():
                ref = self._full_log_probs(kl_batch)
        pred = prediction_mask(kl_batch.target_mask(self.kl_tokens)).to(logp.device)
        per_token = (ref.exp() * (ref - logp)).sum(-1)[pred]
        zeros = torch.zeros(per_token.shape[0], dtype=torch.long, device=per_token.device)
        return ce, reduce_kl(per_token, zeros, 1, self.kl_reduction, self.vocab)


class _HookView:
    """What `hooks_applied` reads from a model (its `hook_dict`), resolved once per LossComputer."""

    def __init__(self, model: TransformerBridge):
        self.hook_dict = model.hook_dict


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for it: to a GPU through pinned memory (a copy from pageable
    memory would first wait for all queued device work, leaving the device idle while the host catches up)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _cat(tensors: list[Tensor]) -> Tensor:
    """torch.cat along dim 0, without a copy for a single tensor."""
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _pad(t: Tensor, width: int, value: float | bool | int) -> Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)
