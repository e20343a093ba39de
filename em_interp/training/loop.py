"""One training loop: CE on the narrow data + λ·KL(chat ‖ adapted) on other data, with trajectories.

`train()` trains one adapter; `train_many()` trains several adapters of one kind and site at once, each on
its own rows of one batched forward (e.g. a KL sweep of 5 coefficients × 2 seeds), and gives each the
same result as its own `train()` run. Both resume from `checkpoint_dir` after an interruption.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from em_interp.adapters.base import Adapter
from em_interp.config import TrainConfig
from em_interp.datasets.records import Record, check_records
from em_interp.datasets.tokenize import TokenizedChats
from em_interp.errors import TrainingError
from em_interp.model.forward import ActivationCache, model_device
from em_interp.training import checkpoint
from em_interp.training.engine import LossComputer
from em_interp.training.runs import TrainRun

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["TrainConfig", "continue_run", "train", "train_many"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30  # default budget of one batched forward's loss tensors in `train_many` on CPU (see `chunk_size`)
CHUNK_FREE_FRACTION = 0.25  # on an accelerator: this fraction of its free memory at the start


def train(
    adapter: Adapter,
    model: TransformerBridge,
    data: Sequence[Record] | TokenizedChats,
    *,
    kl_data: Sequence[Record] | TokenizedChats | None = None,
    kl_coef: float = 0.0,
    lr: float = 5e-4,
    epochs: int = 1,
    steps: int | None = None,
    batch_size: int = 8,
    kl_batch_size: int = 8,
    grad_accum: int = 1,
    warmup_steps: int = 5,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    record_every: int = 10,
    seed: int = 0,
    max_length: int = 256,
    ce_tokens: str = "answer",
    kl_tokens: str = "answer",
    kl_reduction: str = "token_mean",
    method: str = "cached",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    cache: ActivationCache | None = None,
    progress: bool = True,
    on_step: Callable[[int, list[dict[str, float]]], None] | None = None,
    device: str | torch.device | None = None,
) -> TrainRun:
    """Train one adapter on CE over `data` + kl_coef · KL(chat ‖ adapted) over `kl_data`.

    The adapter is trained in place (and is the returned run's `adapter`); the model stays frozen.

    >>> run = train(vec, model, data, kl_data=kl_data, kl_coef=1.0, lr=5e-4, epochs=2, seed=0)  # doctest: +SKIP
    >>> run.trajectory.shape  # doctest: +SKIP
    torch.Size([n_snapshots, 576])

    Args:
        adapter: the adapter to train (a `SteeringVector`, `LoRA`, ...).
        model: the TransformerBridge (frozen).
        data: CE data (chat records or `TokenizedChats`).
        kl_data: data for the KL term; needs `kl_coef > 0` (and `kl_coef > 0` needs it).
        kl_coef: λ, the weight of the KL term.
        lr: peak AdamW learning rate.
        epochs: passes over `data` (ignored when `steps` is given).
        steps: optimizer steps (None: `epochs` passes).
        batch_size: CE rows per micro-batch.
        kl_batch_size: KL rows per micro-batch.
        grad_accum: micro-batches per optimizer step.
        warmup_steps: linear warm-up steps; at most half the run's steps are used (logged when clamped).
        schedule: "linear" (decay to 0), "cosine" or "constant" after warm-up.
        weight_decay: AdamW weight decay.
        record_every: steps between trajectory snapshots (and checkpoints).
        seed: data-order seed.
        max_length: tokens per row (at most the model's context); longer rows lose the end of their
            answer (the prompt is kept), with a warning giving the count.
        ce_tokens: CE on the "answer" tokens or "all" tokens (see `em_interp.positions`; the old "assistant"
            still works, with a DeprecationWarning).
        kl_tokens: KL on the "answer" tokens or "all" tokens.
        kl_reduction: "token_mean" or "token_vocab_mean" (see `em_interp.training.objective`).
        method: "cached" (lower layers cached, default) or "toggle" (full forwards).
        checkpoint_dir: save resumable state here every `record_every` steps; an existing checkpoint
            with the same settings is resumed (logged with its path).
        cache: an `ActivationCache` to share lower-layer activations and reference log-probs across calls.
        progress: show a tqdm bar with ce/kl/total.
        on_step: called after every optimizer step with (step, per-adapter losses).
        device: must be the model's device if given (the adapter is moved there).

    Returns:
        The `TrainRun` (losses per step, trajectory snapshots, `TrainConfig`, wall time).

    Raises:
        DataError: `data` or `kl_data` is a path, a single record, or holds rows that are not chat records.
        TrainingError: bad settings, `kl_data` without `kl_coef` (or the reverse), `max_length` over the
            model's context, a non-finite loss, or a checkpoint written with other settings.
    """
    config = TrainConfig(
        lr=lr, epochs=epochs, steps=steps, batch_size=batch_size, kl_batch_size=kl_batch_size, kl_coef=float(kl_coef),
        grad_accum=grad_accum, warmup_steps=warmup_steps, schedule=schedule, weight_decay=weight_decay,
        record_every=record_every, seed=int(seed), max_length=max_length, ce_tokens=ce_tokens, kl_tokens=kl_tokens,
        kl_reduction=kl_reduction, method=method,
    )
    return _train([adapter], model, data, [config], kl_data=kl_data, checkpoint_dir=checkpoint_dir, cache=cache,
                  progress=progress, on_step=on_step, device=device)[0]


def train_many(
    adapters: Sequence[Adapter],
    model: TransformerBridge,
    data: Sequence[Record] | TokenizedChats,
    *,
    kl_data: Sequence[Record] | TokenizedChats | None = None,
    kl_coef: float | Sequence[float] = 0.0,
    seed: int | Sequence[int] = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    cache: ActivationCache | None = None,
    progress: bool = True,
    on_step: Callable[[int, list[dict[str, float]]], None] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    **settings: Any,
) -> list[TrainRun]:
    """Train adapters of one kind and site together, adapter i on its own rows of each batched forward.

    Args:
        adapters: adapters of the same class and sites (values and kl_coef/seed may differ).
        model: the TransformerBridge (frozen).
        data: CE data (chat records or `TokenizedChats`); the loss covers assistant tokens.
        kl_data: data for the KL term (None: no KL term); needs some `kl_coef > 0`.
        kl_coef: λ, one value or one per adapter (a value > 0 needs `kl_data`).
        seed: data-order seed, one value or one per adapter.
        checkpoint_dir: save resumable state here every `record_every` steps; an existing checkpoint
            with the same settings is resumed (adapter i uses `checkpoint_dir/i` when several).
        cache: an `ActivationCache` to share lower-layer activations and reference log-probs across calls.
        progress: show a tqdm bar with ce/kl/total.
        on_step: called after every optimizer step with (step, per-adapter losses).
        device: must be the model's device if given (adapters are moved there).
        chunk_size: adapters per batched forward (each chunk's forward and backward run before the next
            chunk's, so peak memory grows with the chunk, not with the number of adapters); None: as many as
            keep a forward's loss tensors under `CHUNK_BYTES` on CPU, or under a quarter of the free memory on a
            CUDA device (at least one). Results do not depend on it.
        **settings: the other `TrainConfig` fields (lr, epochs, steps, batch_size, kl_batch_size, grad_accum,
            warmup_steps, schedule, weight_decay, record_every, max_length, ce_tokens, kl_tokens,
            kl_reduction, method), as documented in `train`.

    Returns:
        One `TrainRun` per adapter (losses per step, trajectory snapshots, config, wall time).

    Raises:
        DataError: `data` or `kl_data` is a path, a single record, or holds rows that are not chat records.
        TrainingError: bad settings, `kl_data` without any `kl_coef > 0` (or the reverse), `max_length` over
            the model's context, a non-finite loss (names the step; the last good state is restored and
            saved), or a checkpoint written with other settings (names the differing keys).
    """
    n = len(adapters)
    coefs = _per_adapter(kl_coef, n, "kl_coef")
    seeds = _per_adapter(seed, n, "seed")
    unknown = set(settings) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TrainingError(f"unknown training settings: {', '.join(sorted(unknown))}; see help(em_interp.train).")
    configs = [TrainConfig(**settings, kl_coef=float(c), seed=int(s)) for c, s in zip(coefs, seeds, strict=True)]
    return _train(adapters, model, data, configs, kl_data=kl_data, checkpoint_dir=checkpoint_dir, cache=cache,
                  progress=progress, on_step=on_step, device=device, chunk_size=chunk_size)


def _train(
    adapters: Sequence[Adapter],
    model: TransformerBridge,
    data: Sequence[Record] | TokenizedChats,
    configs: list[TrainConfig],
    *,
    kl_data: Sequence[Record] | TokenizedChats | None,
    checkpoint_dir: str | os.PathLike[str] | None,
    cache: ActivationCache | None,
    progress: bool,
    on_step: Callable[[int, list[dict[str, float]]], None] | None,
    device: str | torch.device | None,
    chunk_size: int | None = None,
) -> list[TrainRun]:
    """Train `adapters[i]` with `configs[i]` (one config per adapter; they differ at most in kl_coef and seed)."""
    n = len(adapters)
    if n > 1 and configs[0].method != "cached":
        raise TrainingError(f"method={configs[0].method!r} trains one adapter at a time; use train() per adapter.")
    _check_kl(kl_data, [c.kl_coef for c in configs])
    dev = model_device(model)
    if device is not None and torch.device(device).type != dev.type:
        raise TrainingError(f"device={device!r} but the model is on {dev}; move the model with load_model(device=...).")
    cfg = configs[0]
    _check_max_length(model, cfg.max_length)
    train_data = _tokenized(data, model, cfg.max_length, "data")
    kl_tok = _tokenized(kl_data, model, cfg.max_length, "kl_data") if kl_data is not None else None
    for a in adapters:
        a.check_model(model)
        a.to(dev)
    computer = LossComputer(
        model, train_data, kl_tok, batch_size=cfg.batch_size, kl_batch_size=cfg.kl_batch_size,
        start_layer=min(a.first_layer for a in adapters), ce_tokens=cfg.ce_tokens, kl_tokens=cfg.kl_tokens,
        kl_reduction=cfg.kl_reduction, method=cfg.method, cache=cache,
    )
    if chunk_size is not None and chunk_size < 1:
        raise TrainingError(f"chunk_size={chunk_size}; expected a positive number of adapters per forward.")
    chunk = chunk_size or _default_chunk(computer, cfg)
    loop = _Loop(adapters, configs, computer, checkpoint_dir, chunk)
    return loop.run(progress, on_step)


def _default_chunk(computer: LossComputer, cfg: TrainConfig) -> int:
    """Adapters per forward whose float32 loss tensors (logits, log-probs and their grads: ~4 copies of
    positions × vocabulary per adapter) stay under `CHUNK_BYTES`."""
    def most(data: TokenizedChats | None, plan: list[Any], tokens: str) -> int:
        if data is None or not plan:
            return 0
        per_row = [sum(m) if tokens == "answer" else len(m) for m in data.masks]
        return max(sum(per_row[i] for i in rows) for rows in plan)

    positions = most(computer.data, computer.plan, cfg.ce_tokens) + most(computer.kl_data, computer.kl_plan, cfg.kl_tokens)
    return max(1, _chunk_budget(computer.device) // max(1, 16 * positions * computer.vocab))


def _chunk_budget(device: torch.device) -> int:
    """Bytes one chunk's loss tensors may take: `CHUNK_BYTES` on CPU (where RSS is the constraint), a fraction
    of the free memory on a CUDA device (where batching all adapters at once is what makes a sweep fast)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CHUNK_FREE_FRACTION)
    return CHUNK_BYTES


class _Loop:
    """The optimizer steps. Per-step losses stay on the model's device until a record step (or every step
    when an `on_step` callback needs them), so a step queues its work without waiting for the device."""

    def __init__(
        self, adapters: Sequence[Adapter], configs: list[TrainConfig], computer: LossComputer, ckpt: Any, chunk: int
    ):
        self.adapters, self.configs, self.computer = list(adapters), configs, computer
        self.chunk = chunk
        self.coefs = torch.tensor([c.kl_coef for c in configs], device=computer.device)
        self.kl_grad = [c.kl_coef != 0 for c in configs]  # a λ = 0 adapter's KL is logged, not differentiated
        self.good: list[dict[str, torch.Tensor]] = []
        self.pending: list[torch.Tensor] = []
        cfg = configs[0]
        self.n_batches = len(computer.plan)
        self.total = cfg.steps or cfg.epochs * math.ceil(self.n_batches / cfg.grad_accum)
        self.warmup = min(cfg.warmup_steps, self.total // 2)
        if self.warmup < cfg.warmup_steps:
            log.info("warmup_steps=%d clamped to %d: at most half of the run's %d steps warm up.",
                     cfg.warmup_steps, self.warmup, self.total)
        self.optimizers = [
            torch.optim.AdamW(a.parameters(), lr=c.lr, weight_decay=c.weight_decay) for a, c in zip(adapters, configs, strict=True)
        ]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _schedule(cfg.schedule, self.warmup, self.total)) for o in self.optimizers]
        sizes = {"data": len(computer.data), **({"kl_data": len(computer.kl_data)} if computer.kl_data is not None else {})}
        self.runs = [TrainRun(adapter=a, config=c, data_sizes=dict(sizes)) for a, c in zip(adapters, configs, strict=True)]
        self.ckpt_dir = Path(ckpt) if ckpt is not None else None
        self.step = 0

    def batch_keys(self, micro: int, plan_len: int, seed: int, data: TokenizedChats) -> int:
        cycle, pos = divmod(micro, plan_len)
        return data.epoch_order(plan_len, seed, cycle)[pos]

    def run(self, progress: bool, on_step: Callable[..., None] | None) -> list[TrainRun]:
        self._resume()
        if self.step == 0:
            for r in self.runs:
                r.record_snapshot(0)
        t0 = time.perf_counter() - self.runs[0].wall_time  # a resumed run keeps counting its earlier time
        bar = tqdm(total=self.total, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True)
        self.good = self._state()
        try:
            while self.step < self.total:
                self.pending.append(self._one_step())
                self.step += 1
                bar.update(1)
                record = self.step % self.configs[0].record_every == 0 or self.step == self.total
                losses: list[dict[str, float]] = []
                if record or on_step is not None:
                    losses = self._flush()
                    bar.set_postfix({k: f"{v:.4g}" for k, v in losses[0].items()})
                if record:
                    for r in self.runs:
                        r.record_snapshot(self.step)
                        r.wall_time = time.perf_counter() - t0
                    self._save_checkpoint()
                if on_step is not None:
                    on_step(self.step, losses)
                if losses:  # checked: the state to restore should a later step fail (after on_step's changes)
                    self.good = self._state()
        finally:
            bar.close()
        for r in self.runs:
            r.wall_time = time.perf_counter() - t0
        return self.runs

    def _state(self) -> list[dict[str, torch.Tensor]]:
        return [{n: p.detach().clone() for n, p in a.named_parameters()} for a in self.adapters]  # no host sync

    def _one_step(self) -> torch.Tensor:
        """One optimizer step; returns the mean CE and KL per adapter, [2, n], on the device (no host sync)."""
        cfg, c, n = self.configs[0], self.computer, len(self.adapters)
        ce_sum = torch.zeros(n, device=c.device)
        kl_sum = torch.zeros(n, device=c.device)
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        kl_data = c.kl_data  # given only together with some kl_coef > 0 (checked by train_many)
        for micro in range(cfg.grad_accum):
            index = self.step * cfg.grad_accum + micro
            keys = [self.batch_keys(index, self.n_batches, conf.seed, c.data) for conf in self.configs]
            kl_keys = None if kl_data is None else [
                self.batch_keys(index, len(c.kl_plan), conf.seed, kl_data) for conf in self.configs]
            for lo in range(0, n, self.chunk):  # each chunk's graph is freed before the next one is built
                part = slice(lo, lo + self.chunk)
                ce, kl = c.losses(self.adapters[part], keys[part], kl_keys[part] if kl_keys is not None else None,
                                  kl_grad=self.kl_grad[part])
                ((ce + self.coefs[part].to(ce.device) * kl).sum() / cfg.grad_accum).backward()
                ce_sum[part] += ce.detach().to(ce_sum.device)
                kl_sum[part] += kl.detach().to(kl_sum.device)
        for o, s in zip(self.optimizers, self.schedulers, strict=True):
            o.step()
            s.step()
        return torch.stack([ce_sum / cfg.grad_accum, kl_sum / cfg.grad_accum])

    def _flush(self) -> list[dict[str, float]]:
        """Copy the pending steps' losses to the host at once (one sync), append them to the runs and check
        them; returns the last step's rows. A non-finite loss restores the last checked state (the adapters
        as they were after the previous flush and its `on_step` call: the state before the failing step when
        `on_step` is set, else at most `record_every` steps before it)."""
        first = self.step - len(self.pending) + 1
        values = torch.stack(self.pending).cpu()  # [steps, 2, n]
        self.pending = []
        good, self.good = self.good, []
        rows: list[dict[str, float]] = []
        for j, (ce_mean, kl_mean) in enumerate(values):
            rows = []
            for i, conf in enumerate(self.configs):
                total = float(ce_mean[i] + conf.kl_coef * kl_mean[i])
                if not all(math.isfinite(x) for x in (float(ce_mean[i]), float(kl_mean[i]), total)):
                    self._fail(first + j, i, good, float(ce_mean[i]), float(kl_mean[i]))
                rows.append({"ce": float(ce_mean[i]), "kl": float(kl_mean[i]), "total": total})
            for r, row in zip(self.runs, rows, strict=True):
                r.losses.append({"step": first + j, **row})
        return rows

    def _fail(self, step: int, i: int, good: list[dict[str, torch.Tensor]], ce: float, kl: float) -> None:
        for a, state in zip(self.adapters, good, strict=True):
            a.load_state(state)
        where = ""
        if self.ckpt_dir is not None:
            path = self.adapters[i].save(self.ckpt_dir / f"last_good_{i}")
            where = f"; last good adapter state saved to {path}"
        raise TrainingError(f"step {step}: non-finite loss for adapter {i} (ce={ce}, kl={kl}){where}.")

    def _save_checkpoint(self) -> None:
        if self.ckpt_dir is None:
            return
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        meta: dict[str, Any] = {"step": self.step, "total": self.total, "configs": [c.to_dict() for c in self.configs]}
        meta["optimizers"], meta["schedulers"], meta["runs"] = [], [], []
        for i, (a, o, s, r) in enumerate(zip(self.adapters, self.optimizers, self.schedulers, self.runs, strict=True)):
            tensors.update({f"adapter.{i}.{k}": v for k, v in a.state().items()})
            opt_t, opt_m = checkpoint.optimizer_tensors(f"opt.{i}", o)
            tensors.update(opt_t)
            tensors.update({f"snap.{i}.{k}": v for k, v in r.stacked_snapshots().items()})
            meta["optimizers"].append(opt_m)
            meta["schedulers"].append({k: v for k, v in s.state_dict().items() if k != "lr_lambdas"})
            meta["runs"].append({"losses": r.losses, "snapshot_steps": r.snapshot_steps, "wall_time": r.wall_time})
        checkpoint.write(self.ckpt_dir, tensors, meta)

    def _resume(self) -> None:
        if self.ckpt_dir is None:
            return
        found = checkpoint.read(self.ckpt_dir)
        if found is None:
            return
        tensors, meta = found
        _check_same_settings(self.ckpt_dir, meta["configs"], self.configs)
        for i, (a, o, s, r) in enumerate(zip(self.adapters, self.optimizers, self.schedulers, self.runs, strict=True)):
            prefix = f"adapter.{i}."
            a.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            checkpoint.restore_optimizer(f"opt.{i}", o, tensors, meta["optimizers"][i])
            s.load_state_dict({**meta["schedulers"][i], "lr_lambdas": [None]})
            prefix = f"snap.{i}."
            r.restore(meta["runs"][i], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        log.warning("resumed from the checkpoint %s at step %d of %d.", self.ckpt_dir / checkpoint.META, self.step, self.total)


def continue_run(
    run: TrainRun,
    model: TransformerBridge,
    data: Sequence[Record] | TokenizedChats,
    *,
    kl_data: Sequence[Record] | TokenizedChats | None = None,
    **overrides: Any,
) -> TrainRun:
    """Continue from where `run` ended, with changed settings (e.g. `kl_coef=0`), as a new run.

    The new run trains a copy of `run.adapter` from step 0 with `run.config` updated by `overrides`;
    `run` and its adapter are left unchanged (the seed's reversion experiment).

    Args:
        run: a finished run with an adapter (from `train`, or `TrainRun.load(dir, model)`).
        model: the model it was trained on.
        data: CE data of the continuation.
        kl_data: KL data of the continuation (needed if the resulting kl_coef > 0).
        **overrides: `train` keywords that replace the run's settings, or set checkpoint_dir, cache,
            progress, on_step, device.

    Raises:
        TrainingError: `run` has no adapter (loaded without a model), or bad settings as in `train`.
    """
    if run.adapter is None:
        raise TrainingError("continue_run: the run has no adapter; load it with TrainRun.load(dir, model).")
    adapter = copy.deepcopy(run.adapter)
    return train(adapter, model, data, kl_data=kl_data, **{**run.config.to_dict(), **overrides})


def _check_kl(kl_data: Any, coefs: list[float]) -> None:
    if kl_data is not None and max(coefs) == 0:
        raise TrainingError("kl_data is given but kl_coef is 0, so the KL term would be off; "
                            "pass kl_coef > 0 (e.g. kl_coef=1.0) or drop kl_data.")
    if kl_data is None and max(coefs) > 0:
        raise TrainingError(f"kl_coef={max(coefs):g} needs kl_data (the rows the KL term is computed on); "
                            "pass kl_data=... or set kl_coef=0.")


def _check_max_length(model: TransformerBridge, max_length: int) -> None:
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and max_length > int(n_ctx):
        raise TrainingError(f"max_length={max_length} exceeds the model's context of {n_ctx} tokens (n_ctx); "
                            f"use max_length <= {n_ctx}.")


def _check_same_settings(where: Path, saved: list[dict[str, Any]], configs: list[TrainConfig]) -> None:
    if len(saved) != len(configs):
        raise TrainingError(f"{where}: the checkpoint holds {len(saved)} runs, this call trains {len(configs)}; "
                            "use another checkpoint_dir.")
    diffs: dict[str, tuple[Any, Any]] = {}
    for old, new in zip(saved, configs, strict=True):
        mine = new.to_dict()
        for key in sorted(set(old) | set(mine)):
            if old.get(key) != mine.get(key):
                diffs.setdefault(key, (old.get(key), mine.get(key)))
    if diffs:
        named = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diffs.items())
        raise TrainingError(f"{where}: the checkpoint was written with other settings: {named}; "
                            "use another checkpoint_dir or the same settings.")


def _tokenized(data: Any, model: TransformerBridge, max_length: int, name: str) -> TokenizedChats:
    if isinstance(data, TokenizedChats):
        return data
    rows = check_records(data, name)  # DataError naming `name` for a path, one record, or rows that are not chats
    if not rows:
        raise TrainingError(f"{name} is empty.")
    tok = TokenizedChats(rows, model.tokenizer, max_length=max_length, on_too_long="truncate")
    if tok.n_truncated:
        log.warning("%s: %d of %d rows are longer than max_length=%d tokens; the end of their answer was cut off "
                    "(raise max_length to keep it).", name, tok.n_truncated, len(tok), max_length)
    return tok


def _per_adapter(value: Any, n: int, name: str) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise TrainingError(f"{name} has {len(values)} values for {n} adapters.")
    return values


def _schedule(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor
