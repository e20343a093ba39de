"""Loss computation for training: the fast "cached" method and the authors' "toggle" method.

"toggle" (the reference, as in the authors' code): per step a steered forward over the whole model on
the train batch, a steered forward on the KL batch and an unsteered no-grad forward on the KL batch,
with full-vocabulary log-softmax at every position.

"cached" does the same loss with less work:
- the blocks below the adapter's first layer run once per batch, without grad; their output residual
  is cached (`ActivationCache`, shared across epochs and across runs that share data and layer), and the
  forward resumes from it;
- the chat model's reference log-probs on the KL data are computed once, only at the KL positions;
- the unembedding runs only at positions that enter a loss;
- the positions, targets and row owners are worked out on the host from the batch masks, so a step
  queues its whole forward and backward without waiting for the device (one sync per step, the loss);
- with the model on an accelerator, hook-free bridge components run as plain HF modules (SDPA attention,
  `em_interp.fastpath`), and a host cache is pinned and copied without blocking.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from em_interp import fastpath
from em_interp.adapters.base import Adapter
from em_interp.adapters.stack import stacked_hooks
from em_interp.datasets.tokenize import ChatBatch, TokenizedChats
from em_interp.hooks import hooks_applied
from em_interp.models import lower_forward, model_device, resume_forward, unembed
from em_interp.objectives import group_mean, log_probs, prediction_mask, reduce_kl, token_ce, token_kl


class ActivationCache:
    """Residuals entering block `layer` and reference log-probs, per fixed batch, computed once.

    Keys include the data fingerprint, batch size and layer, so one cache can serve several runs
    (e.g. a sweep) over the same data. Tensors live on `device` (default CPU, so GPU memory stays
    bounded; pass the model's device to keep them there when they fit).

    Sizes: the residuals take tokens × d_model × dtype bytes (SmolLM2, 10k tokens: 23 MB in float32;
    Qwen2.5-14B, 100k tokens in bf16: 1 GB); reference log-probs take KL tokens × vocab × 4 bytes
    (SmolLM2, 5k KL tokens: 1 GB; Qwen2.5-14B, one batch of 8 × 256 tokens with ~800 KL tokens: 0.5 GB),
    so they are kept as final hidden states instead (KL tokens × d_model) and unembedded again at each
    use when a batch's log-probs are larger than `max_ref_bytes`, when all stored log-probs would pass
    `max_ref_total_bytes`, or when the cache lives on another device than the model (copying 0.5 GB
    per step costs more than the unembedding). A host cache of a GPU model is pinned.

    With `directory`, every entry is written there as a safetensors file and read back at each use, so
    memory stays bounded whatever the data size (for caches that do not fit in host memory).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        max_ref_bytes: int = 2 << 30,
        max_ref_total_bytes: int = 8 << 30,
        directory: str | os.PathLike[str] | None = None,
    ):
        self.device = torch.device(device)
        self.max_ref_bytes = max_ref_bytes
        self.max_ref_total_bytes = max_ref_total_bytes
        self.directory = Path(directory) if directory is not None else None
        self._store: dict[tuple[Any, ...], Tensor] = {}
        self._on_disk: dict[tuple[Any, ...], tuple[Path, int]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...], compute: Any) -> Tensor:
        if key in self._store:
            self.hits += 1
            return self._store[key]
        if key in self._on_disk:
            self.hits += 1
            return load_file(str(self._on_disk[key][0]))["value"]
        self.misses += 1
        value = compute()
        if self.directory is not None:
            return self._to_disk(key, value)
        if self.device.type == "cpu" and value.device.type == "cuda":
            value = torch.empty_like(value, device="cpu", pin_memory=True).copy_(value)
        else:
            value = value.to(self.device)
        self._store[key] = value
        return value

    def keeps_log_probs(self, nbytes: int, compute_device: torch.device) -> bool:
        """Whether reference log-probs of `nbytes` are stored as such (else as hidden states)."""
        if compute_device.type != self.device.type or nbytes > self.max_ref_bytes:
            return False
        return self.nbytes() + nbytes <= self.max_ref_total_bytes

    def _to_disk(self, key: tuple[Any, ...], value: Tensor) -> Tensor:
        self.directory.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        path = self.directory / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.safetensors"  # type: ignore[operator]
        value = value.detach().to("cpu").contiguous()
        tmp = path.with_suffix(".tmp")
        save_file({"value": value}, str(tmp))
        os.replace(tmp, path)
        self._on_disk[key] = (path, value.numel() * value.element_size())
        return value

    def __len__(self) -> int:
        return len(self._store) + len(self._on_disk)

    def nbytes(self) -> int:
        """Bytes held in memory (entries on disk do not count)."""
        return sum(t.numel() * t.element_size() for t in self._store.values())


class LossComputer:
    """Computes per-adapter CE and KL for one step (several adapters = disjoint rows of one batch)."""

    def __init__(
        self,
        model: Any,
        data: TokenizedChats,
        kl_data: TokenizedChats | None,
        *,
        batch_size: int,
        kl_batch_size: int,
        start_layer: int,
        ce_tokens: str = "assistant",
        kl_tokens: str = "assistant",
        kl_reduction: str = "token_mean",
        method: str = "cached",
        cache: ActivationCache | None = None,
    ):
        self.model = model
        self.device = model_device(model)
        self.data, self.kl_data = data, kl_data
        self.plan = data.batch_plan(batch_size)
        self.kl_plan = kl_data.batch_plan(kl_batch_size) if kl_data is not None else []
        self.start = min(start_layer, model.cfg.n_layers - 1)
        self.ce_tokens, self.kl_tokens, self.kl_reduction = ce_tokens, kl_tokens, kl_reduction
        self.method = method
        self.cache = cache if cache is not None else ActivationCache()
        self.vocab = int(model.cfg.d_vocab)
        self._host: dict[tuple[str, int], ChatBatch] = {}
        self._device: dict[tuple[str, int], ChatBatch] = {}
        self._fast = fastpath.enabled(self.device, model=model)
        # Hashing the data and rebuilding the bridge's alias table (`hook_dict`, ~5 ms on a 48-block model)
        # are done once here, not at every step: both would leave the device idle at each step's start.
        self._fingerprint = {"train": data.fingerprint(), "kl": kl_data.fingerprint() if kl_data is not None else ""}
        self._hooks_view = _HookView(model)

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
            self._device[key] = self._host_batch(which, k).to(self.device)
        return self._device[key]

    def _residual(self, which: str, k: int) -> Tensor:
        data = self.data if which == "train" else self.kl_data
        assert data is not None
        key = ("resid", self._fingerprint[which], len(self.plan[0] if which == "train" else self.kl_plan[0]), self.start, k)

        def compute() -> Tensor:
            batch = self._batch(which, k)
            with torch.no_grad():
                return lower_forward(self.model, batch.input_ids, self.start, self._mask([self._host_batch(which, k)], batch.attention_mask))

        return self.cache.get(key, compute).to(self.device, non_blocking=True)

    def _reference(self, k: int) -> Tensor:
        """Reference log-probs [n, vocab] (or final hidden states [n, d_model]) at batch k's KL positions."""
        assert self.kl_data is not None
        key = ("ref", self._fingerprint["kl"], len(self.kl_plan[0]), self.kl_tokens, k)

        def compute() -> Tensor:
            batch = self._batch("kl", k)
            with torch.no_grad():
                attn = self._mask([self._host_batch("kl", k)], batch.attention_mask)
                hidden = resume_forward(self.model, self._residual("kl", k), self.start, attn)
                index, _, _ = self._targets([self._host_batch("kl", k)], hidden.shape[1], self.kl_tokens, hidden.device)
                h = _gather(hidden, index)
                if not self.cache.keeps_log_probs(h.shape[0] * self.vocab * 4, h.device):
                    return h
                return log_probs(unembed(self.model, h))

        value = self.cache.get(key, compute).to(self.device, non_blocking=True)
        if value.shape[-1] != self.vocab:  # stored as hidden states: unembed again
            with torch.no_grad():
                value = log_probs(unembed(self.model, value))
        return value

    # --- losses --------------------------------------------------------------------------------
    def losses(self, adapters: Sequence[Adapter], train_keys: Sequence[int], kl_keys: Sequence[int] | None) -> tuple[Tensor, Tensor]:
        """CE [N] and KL [N] (zeros without KL data) for adapters[i] on batch train_keys[i] / kl_keys[i]."""
        n = len(adapters)
        if self.method == "toggle":
            if n != 1:
                raise ValueError("the toggle method trains one adapter at a time")
            return self._toggle(adapters[0], train_keys[0], None if kl_keys is None else kl_keys[0])
        resid = [self._residual("train", k) for k in train_keys]
        logits, targets, owner = self._adapted_logits(adapters, "train", train_keys, resid, self.ce_tokens)
        ce = group_mean(token_ce(logits, targets), owner, n)
        if kl_keys is None:
            return ce, torch.zeros_like(ce)
        refs = torch.cat([self._reference(k) for k in kl_keys])
        resid = [self._residual("kl", k) for k in kl_keys]
        logits, _, owner = self._adapted_logits(adapters, "kl", kl_keys, resid, self.kl_tokens)
        kl = reduce_kl(token_kl(refs, log_probs(logits)), owner, n, self.kl_reduction, self.vocab)
        return ce, kl

    def _mask(self, host: list[ChatBatch], mask: Tensor) -> Tensor | None:
        """The attention mask to pass on: None on the fast path when no row is padded (checked on the host),
        so HF's mask code neither builds a mask nor waits for the device to inspect it."""
        if self._fast and all(bool(b.attention_mask.all()) for b in host):
            return None
        return mask

    def _targets(self, batches: list[ChatBatch], width: int, tokens: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Flat indices of the prediction positions in the stacked [rows × width] batch, their target ids
        and their row numbers — worked out on the host (no device sync), moved to `device`."""
        mask = torch.cat([_pad(b.target_mask(tokens), width, False) for b in batches])
        ids = torch.cat([_pad(b.input_ids, width, 0) for b in batches])
        pred = prediction_mask(mask)
        index = pred.flatten().nonzero().squeeze(1)
        rows = torch.div(index, width, rounding_mode="floor")
        return (index.to(device, non_blocking=True), ids[mask].to(device, non_blocking=True), rows.to(device, non_blocking=True))

    def _adapted_logits(
        self, adapters: Sequence[Adapter], which: str, keys: Sequence[int], resid: list[Tensor], tokens: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits at target positions of the stacked batches with adapter i on batch keys[i]'s rows."""
        host = [self._host_batch(which, k) for k in keys]
        width = max(b.input_ids.shape[1] for b in host)
        attn = torch.cat([_pad(self._batch(which, k).attention_mask, width, 0) for k in keys])
        res = torch.cat([_pad(r, width, 0.0) for r in resid])
        sizes = [b.input_ids.shape[0] for b in host]
        owner = torch.repeat_interleave(torch.arange(len(host)), torch.tensor(sizes)).to(self.device, non_blocking=True)
        index, targets, rows = self._targets(host, width, tokens, self.device)
        hooks = adapters[0].hooks(adapters[0].scale) if len(adapters) == 1 else stacked_hooks(adapters, owner)
        with hooks_applied(self._hooks_view, hooks):
            hidden = resume_forward(self.model, res, self.start, self._mask(host, attn))
        dev = hidden.device  # the last block's device when the model is spread over several
        return unembed(self.model, _gather(hidden, index.to(dev))), targets, owner[rows].to(dev)

    def _toggle(self, adapter: Adapter, k: int, kl_k: int | None) -> tuple[Tensor, Tensor]:
        batch = self._batch("train", k)
        hooks = adapter.hooks(adapter.scale)
        with hooks_applied(self.model, hooks):
            logp = log_probs(self.model(batch.input_ids, attention_mask=batch.attention_mask))
        mask = batch.target_mask(self.ce_tokens).to(logp.device)  # logits sit on the last block's device
        pred, targets = prediction_mask(mask), batch.input_ids.to(logp.device)[mask]
        ce = -logp[pred].gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean().reshape(1)
        if kl_k is None:
            return ce, torch.zeros_like(ce)
        kl_batch = self._batch("kl", kl_k)
        with hooks_applied(self.model, hooks):
            logp = log_probs(self.model(kl_batch.input_ids, attention_mask=kl_batch.attention_mask))
        with torch.no_grad():
            ref = log_probs(self.model(kl_batch.input_ids, attention_mask=kl_batch.attention_mask))
        pred = prediction_mask(kl_batch.target_mask(self.kl_tokens)).to(logp.device)
        per_token = (ref.exp() * (ref - logp)).sum(-1)[pred]
        zeros = torch.zeros(per_token.shape[0], dtype=torch.long, device=per_token.device)
        return ce, reduce_kl(per_token, zeros, 1, self.kl_reduction, self.vocab)


class _HookView:
    """What `hooks_applied` reads from a model (its `hook_dict`), resolved once per LossComputer."""

    def __init__(self, model: Any):
        self.hook_dict = model.hook_dict


def _gather(hidden: Tensor, index: Tensor) -> Tensor:
    """Rows `index` of hidden [batch, pos, d] flattened to [batch·pos, d] (= hidden[pred], without a sync)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)


def _pad(t: Tensor, width: int, value: float | bool | int) -> Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)
