"""Reports: plotly figures and one self-contained, offline HTML page, for any named runs or for the study.

>>> import em_interp as em
>>> em.report.build({"kl=0": run_a, "kl=1e3": run_b}, "runs/kl_report")  # doctest: +SKIP
PosixPath('runs/kl_report/report.html')
>>> from em_interp.report import load_results, write_report
>>> results = load_results("runs/demo")                        # doctest: +SKIP
>>> write_report(results, "runs/demo/report.html")             # doctest: +SKIP
PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from em_interp.errors import OutputPathError, ReportError
from em_interp.fileio import write_text
from em_interp.report import figures
from em_interp.report.html import SECTIONS, render
from em_interp.report.plain import plain
from em_interp.report.runs import build, runs_results

log = logging.getLogger(__name__)

__all__ = ["SECTIONS", "build", "figures", "load_results", "plain", "render", "runs_results", "write_report"]


def write_report(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the study report as one self-contained HTML file (plotly.js inlined; opens offline).

    The file is written to a temporary name next to `path` and renamed, so a failure never leaves a
    half-written report behind. Sections missing from `results` are shown as a note.

    Args:
        results: the study's results dict (numpy arrays, tensors and dataclasses are converted).
        path: the HTML file to write (parent directories are created).

    Returns:
        The path written.

    Raises:
        ReportError: `results` is not a dict, or the file could not be written.

    >>> write_report(results, "runs/demo/report.html")  # doctest: +SKIP
    """
    if not isinstance(results, Mapping):
        raise ReportError(f"write_report: results is a {type(results).__name__}; expected the study's results dict.")
    path = Path(path)
    page = render(plain(results))
    try:
        write_text(path, page)
    except (OSError, OutputPathError) as exc:
        raise ReportError(f"write_report: could not write {path}: {exc}") from exc
    log.info("report: wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a study's `results.json` (from its run dir, or the file's own path).

    Args:
        run_dir: the run dir written by `em-interp demo` / `run_study`, or a path to a results JSON file.

    Returns:
        The results dict (missing numbers are None).

    Raises:
        ReportError: no such file, invalid JSON (names line and column), or not a JSON object.
    """
    p = Path(run_dir)
    file = p / "results.json" if p.is_dir() else p
    if not file.is_file():
        raise ReportError(f"{file}: not found; expected the results.json of a run dir written by `em-interp demo`.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{file}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}).") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{file}: the top level is a {type(data).__name__}; expected a JSON object of results.")
    return data
