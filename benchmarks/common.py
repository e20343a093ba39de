"""Shared pieces of the trainer benchmarks: one optimizer step per method, interleaved timing, records.

Baselines (what `speedup_*` divides; see benchmarks/README.md):
- "authors_hf": the authors' steering-vector step — full forwards on plain HF modules (SDPA attention, hook on
  the MLP down-projection output), train batch + KL batch with the adapter, KL batch without (the reference),
  full-vocabulary log-softmax at every position, uncompiled: `method="toggle"` with the fast path on.
- "authors_hf_compiled": the same with the plain decoder layers compiled (`torch.compile`, as our path may be).
- "bridge_toggle": the same step through the TransformerBridge (eager attention, its hooks): the fast path off.
- "precomputed_reference": the authors' KL-LoRA step — as "authors_hf" but the reference log-probs of each KL
  batch are computed once and reused (`method="precomputed_reference"`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from em_interp.datasets import TokenizedChats
from em_interp.model import fastpath
from em_interp.model.forward import model_device
from em_interp.training.engine import ActivationCache, LossComputer

BASELINES = {
    # name: (trainer method, fast path mode, compile the plain decoder layers)
    "authors_hf": ("toggle", "on", False),
    "authors_hf_compiled": ("toggle", "on", True),
    "bridge_toggle": ("toggle", "off", False),
    "precomputed_reference": ("precomputed_reference", "on", False),
}


@contextlib.contextmanager
def fast_path(mode: str, compile_layers: bool = False) -> Iterator[None]:
    """Set the fast-path mode (and compile flag) for the duration of the context."""
    old = fastpath.fast_path_mode()
    fastpath.set_fast_path(mode, compile=compile_layers)
    try:
        yield
    finally:
        fastpath.set_fast_path(old["mode"], compile=old["compile"])


class Stepper:
    """One adapter trained by one method, one optimizer step per call (the trainer's per-step work: losses,
    backward, AdamW step), on the same batch order as every other Stepper built with the same data."""

    def __init__(self, model: Any, adapter: Any, data: TokenizedChats, kl_data: TokenizedChats, *, method: str,
                 mode: str = "auto", compile_layers: bool = False, batch_size: int = 8, kl_coef: float = 1.0,
                 lr: float = 5e-4, cache: ActivationCache | None = None):
        self.mode, self.compile_layers, self.kl_coef = mode, compile_layers, kl_coef
        self.adapter = adapter.to(model_device(model))  # as `em.train` does: the adapter lives on the model's device
        with fast_path(mode, compile_layers):  # the LossComputer fixes its fast-path choice when built
            self.computer = LossComputer(model, data, kl_data, batch_size=batch_size, kl_batch_size=batch_size,
                                         start_layer=adapter.first_layer, method=method, cache=cache)
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr)
        self.data, self.kl_data, self.step_index = data, kl_data, 0
        self.n_train, self.n_kl = len(self.computer.plan), len(self.computer.kl_plan)

    def step(self) -> torch.Tensor:
        """One optimizer step; returns the total loss on the device (no host sync, as in the trainer)."""
        i = self.step_index
        key = self.data.epoch_order(self.n_train, 0, i // self.n_train)[i % self.n_train]
        kl_key = self.kl_data.epoch_order(self.n_kl, 0, i // self.n_kl)[i % self.n_kl]
        with fast_path(self.mode, self.compile_layers):
            self.optimizer.zero_grad(set_to_none=True)
            ce, kl = self.computer.losses([self.adapter], [key], [kl_key])
            total = ce + self.kl_coef * kl
            total.sum().backward()
            self.optimizer.step()
        self.step_index += 1
        return total.detach().sum()


def interleaved(
    steppers: dict[str, Stepper], n_steps: int, sync: Callable[[], None], cuda_peaks: dict[str, float] | None = None,
    block: int = 1, cuda: bool = False,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every Stepper `block` steps per round until each has run `n_steps` (methods interleaved round by round,
    so machine noise falls on all alike). Within a block steps run back to back as in the trainer (no host sync
    between them); with `cuda` each step's time is the interval between CUDA events recorded between steps (the
    device timeline), elsewhere the host clock (CPU work is synchronous). Returns seconds per step and the total
    loss per step, by name. With `cuda_peaks` (and `cuda`), the CUDA peak allocation of each method's own blocks is stored
    there, in GiB."""
    times: dict[str, list[float]] = {k: [] for k in steppers}
    losses: dict[str, list[float]] = {k: [] for k in steppers}
    for first in range(0, n_steps, block):
        for name, s in steppers.items():
            steps = min(block, n_steps - first)
            sync()
            if cuda_peaks is not None:
                torch.cuda.reset_peak_memory_stats()
            marks: list[Any] = [_mark(cuda)]
            totals = []
            for _ in range(steps):
                totals.append(s.step())
                if not cuda:
                    sync()  # host clock: the step must have finished (a no-op on a CPU)
                marks.append(_mark(cuda))
            sync()
            times[name] += [_seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
            losses[name] += [float(t) for t in totals]
            if cuda_peaks is not None:
                cuda_peaks[name] = max(cuda_peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    return times, losses


def _mark(cuda: bool) -> Any:
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(a: Any, b: Any) -> float:
    return b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3


def spread(xs: list[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of step times."""
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "iqr": q[2] - q[0], "n": len(xs)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "transformer-lens", "em-interp"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def command() -> str:
    return "python " + " ".join(sys.argv)


class GpuMonitor:
    """The GPU's SM clock, power draw and clock-limit reasons, sampled by `nvidia-smi` every 100 ms in the background
    while phases of a benchmark run (`with monitor.phase("steps"): ...`); `summary()` gives each phase's medians.
    Without `nvidia-smi` nothing is sampled and `summary()` says so."""

    QUERY = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"
    SW_POWER_CAP = 0x4  # bit of clocks_throttle_reasons.active: the clock is lowered to hold the power limit

    def __init__(self, log: Path):
        self.log, self.phases = log, []
        self._out = log.open("w")
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=self._out, stderr=subprocess.DEVNULL)
        except (FileNotFoundError, PermissionError):
            self._proc = None
        atexit.register(self.stop)  # the sampler must not outlive a run that fails before stop()

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.phases.append((label, start, time.time()))

    def summary(self) -> dict[str, Any]:
        """Per phase: samples, median SM clock (MHz), median power (W), share of samples held at the power limit."""
        if self._proc is None:
            return {"error": "nvidia-smi not available: clocks not sampled"}
        return phase_summary(read_samples(self.log), self.phases)

    def stop(self) -> None:
        """End the sampling (again: a no-op)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait()
        self._out.close()


def read_samples(log: Path) -> list[tuple[float, float, float, int]]:
    """(epoch seconds, SM MHz, watts, limit-reason bits) of every complete line of a GpuMonitor log."""
    out = []
    for line in log.read_text().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time()
            out.append((t, float(parts[1]), float(parts[2]), int(parts[3], 16)))
        except ValueError:
            continue
    return out


def phase_summary(samples: list[tuple[float, float, float, int]], phases: list[tuple[str, float, float]]) -> dict[str, Any]:
    """GpuMonitor.summary for (time, SM MHz, W, reason bits) samples and (label, start, end) phases."""
    out: dict[str, Any] = {}
    for label, start, end in phases:
        s = [x for x in samples if start <= x[0] <= end]
        out[label] = {"samples": len(s)} | ({
            "sm_mhz_median": statistics.median(x[1] for x in s), "power_w_median": statistics.median(x[2] for x in s),
            "power_capped_share": sum(bool(x[3] & GpuMonitor.SW_POWER_CAP) for x in s) / len(s)} if s else {})
    return out
