"""A report for any named set of training runs: losses, norms, trajectory PCA and the cosine matrix.

>>> import em_interp as em
>>> em.report.build({"kl=0": run_a, "kl=1e3": run_b}, "runs/kl_report")  # doctest: +SKIP
PosixPath('runs/kl_report/report.html')

`runs_results` computes the plain results dict the page is drawn from; the narrow-vs-general study builds
its training and PCA sections with the same `training_entry` and `pca_section`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from em_interp.errors import OutputPathError, ReportError
from em_interp.fileio import write_text
from em_interp.geometry.pca import trajectory_pca
from em_interp.geometry.similarity import cosine_matrix
from em_interp.report.figures import styles_for
from em_interp.report.html import render_runs
from em_interp.report.plain import plain
from em_interp.training.runs import TrainRun

log = logging.getLogger(__name__)


def training_entry(run: TrainRun) -> dict[str, Any]:
    """A run's losses, snapshot steps, wall time, final norm and kl_coef (one entry of the "training" section)."""
    norm = run.adapter.norm if run.adapter is not None else None
    return {"losses": run.losses, "snapshot_steps": run.snapshot_steps, "wall_time": run.wall_time, "norm": norm,
            "kl_coef": run.config.kl_coef}


def pca_section(runs: Mapping[str, TrainRun], n_components: int = 3) -> dict[str, Any]:
    """One PCA over all runs' snapshots: explained variance, names, and each run's path and steps by name."""
    pca = trajectory_pca(dict(runs), n_components=n_components)
    return {"explained_variance_ratio": pca.explained_variance_ratio, "names": pca.names,
            "paths": dict(zip(pca.names, pca.paths, strict=True)),
            "steps": dict(zip(pca.names, pca.steps, strict=True))}


def snapshot_norms(run: TrainRun) -> list[float]:
    """The adapter's norm at each snapshot (its own `norm`: ‖alpha·v‖ or mean ‖ΔW‖_F); for a run loaded
    without a model, the L2 norm of the snapshot's parameters."""
    if run.adapter is None:
        return [float(sum(float((v.float() ** 2).sum()) for v in s.values()) ** 0.5) for s in run.snapshots]
    clone = copy.deepcopy(run.adapter)  # the run's own adapter is left untouched
    out = []
    for state in run.snapshots:
        clone.load_state(dict(state))
        out.append(float(clone.norm))
    return out


def runs_results(runs: Mapping[str, TrainRun], n_components: int = 3) -> dict[str, Any]:
    """The results dict `render_runs` draws, for runs named by the mapping's keys (in its order).

    Args:
        runs: name -> `TrainRun` (with snapshots for the PCA and norms; adapters of one shape for the PCA
            and cosine sections, else those sections are left out with a log message).
        n_components: principal components fitted.

    Returns:
        Plain JSON values: "runs" (a summary row per run), "training", "norms", "pca", "cosine_matrix",
        "styles" (a distinct colour per run).

    Raises:
        ReportError: `runs` is not a non-empty mapping of name -> TrainRun.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ReportError(f"report: runs is a {type(runs).__name__}; expected a non-empty dict name -> TrainRun.")
    for name, run in runs.items():
        if not isinstance(run, TrainRun):
            raise ReportError(f"report: runs[{name!r}] is a {type(run).__name__}; expected a TrainRun.")
    names = [str(n) for n in runs]
    named = dict(zip(names, runs.values(), strict=True))
    results: dict[str, Any] = {"styles": styles_for(names)}
    results["training"] = {n: training_entry(r) for n, r in named.items()}
    results["runs"] = {n: _summary(r) for n, r in named.items()}
    results["norms"] = {n: {"steps": r.snapshot_steps, "norms": snapshot_norms(r)} for n, r in named.items()}
    with_snapshots = {n: r for n, r in named.items() if r.snapshots}
    try:
        results["pca"] = pca_section(with_snapshots, n_components) if with_snapshots else None
    except Exception as exc:  # e.g. adapters of different shapes: the rest of the report still stands
        log.warning("report: no trajectory PCA (%s)", exc)
    finals = {n: r.adapter if r.adapter is not None else r for n, r in named.items()}
    try:
        cm = cosine_matrix(finals) if len(finals) > 1 else None
        results["cosine_matrix"] = {"labels": cm.labels, "matrix": cm.matrix} if cm is not None else None
    except Exception as exc:
        log.warning("report: no cosine matrix (%s)", exc)
    return plain(results)


def _summary(run: TrainRun) -> dict[str, Any]:
    last = run.final_losses()
    meta = run.adapter.metadata() if run.adapter is not None else run.adapter_meta
    return {"kind": meta.get("kind"), "steps": len(run.losses), "final ce": last.get("ce"), "final kl": last.get("kl"),
            "norm": run.adapter.norm if run.adapter is not None else None, "lr": run.config.lr,
            "kl_coef": run.config.kl_coef, "seed": run.config.seed, "wall time (s)": run.wall_time}


def build(
    runs: Mapping[str, TrainRun], out_dir: str | os.PathLike[str], *, title: str = "em_interp — runs",
    n_components: int = 3,
) -> Path:
    """Draw any named set of runs into `out_dir/report.html` (self-contained, opens offline), with the numbers
    it shows in `out_dir/results.json`.

    Args:
        runs: name -> `TrainRun`, e.g. `{"kl=0": run_a, "kl=1e3": run_b}`.
        out_dir: the directory written (created if missing; files are written atomically).
        title: the page title.
        n_components: principal components of the trajectory PCA.

    Returns:
        The path of `report.html`.

    Raises:
        ReportError: bad `runs`, or the files could not be written.
    """
    results = runs_results(runs, n_components)
    out = Path(out_dir)
    try:
        write_text(out / "results.json", json.dumps(results, indent=1))
        path = write_text(out / "report.html", render_runs(results, title))
    except (OSError, OutputPathError) as exc:
        raise ReportError(f"report.build: could not write into {out}: {exc}") from exc
    log.info("report: wrote %s", path)
    return Path(path)
