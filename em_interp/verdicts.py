"""Plain-language verdicts on the seed's three claims, computed from the study's measured numbers.

Each verdict is "confirmed", "not confirmed" or "unclear", with the numbers it rests on:
- efficiency: the general solution reaches lower loss at equal norm than the narrow one;
- stability: the narrow solution's loss rises faster under orthogonal noise (relative increase);
- reversion: without the KL term the narrow solution moves toward the general one (cosine rises).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONFIRMED, NOT_CONFIRMED, UNCLEAR = "confirmed", "not confirmed", "unclear"


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """All three verdicts from a study's results dict ("unclear" where an analysis is missing)."""
    out = {}
    for name, judge in (("efficiency", _pair(efficiency_verdict)), ("stability", _pair(stability_verdict)),
                        ("reversion", reversion_verdict)):
        try:
            out[name] = judge(results[name])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            out[name] = {"verdict": UNCLEAR, "text": f"Not measured ({type(exc).__name__}: {exc})."}
    return out


def _pair(fn: Any) -> Any:
    return lambda section: fn(section["general"], section["narrow"])


def efficiency_verdict(general: dict[str, Any], narrow: dict[str, Any]) -> dict[str, Any]:
    """Compare loss-vs-norm curves on their shared norm range (linear interpolation)."""
    gn, gl = np.asarray(general["norms"], float), np.asarray(general["losses"], float)
    nn, nl = np.asarray(narrow["norms"], float), np.asarray(narrow["losses"], float)
    top = min(gn.max(), nn.max())
    grid = np.linspace(0, top, 21)[1:] if top > 0 else np.array([])
    gap = np.interp(grid, nn, nl) - np.interp(grid, gn, gl) if grid.size else np.array([0.0])
    frac = float((gap > 0).mean()) if np.isfinite(gap).all() else float("nan")
    lower_min = float(general["min_loss"]) < float(narrow["min_loss"])
    if lower_min and frac >= 0.7:
        verdict = CONFIRMED
    elif not lower_min and frac <= 0.3:
        verdict = NOT_CONFIRMED
    else:
        verdict = UNCLEAR
    text = (
        f"Lowest loss: general {general['min_loss']:.3f} at norm {general['best_norm']:.2f}, narrow "
        f"{narrow['min_loss']:.3f} at norm {narrow['best_norm']:.2f}. At equal norm the general vector has the lower "
        f"loss on {frac:.0%} of the shared norm range (mean gap {float(gap.mean()):+.3f} nats)."
    )
    return {"verdict": verdict, "text": text, "fraction_lower": frac, "mean_gap": float(gap.mean())}


def stability_verdict(general: dict[str, Any], narrow: dict[str, Any]) -> dict[str, Any]:
    """Narrow vs general relative loss increase per ε, judged against the seeds' standard errors."""
    eps = np.asarray(general["eps"], float)
    gm, nm = _arr(general["relative_mean"]), _arr(narrow["relative_mean"])
    n_seeds = max(2, len(general.get("seeds", [])) or 2)
    se = np.sqrt(np.nan_to_num(_arr(general["relative_sd"])) ** 2 + np.nan_to_num(_arr(narrow["relative_sd"])) ** 2)
    se = se / np.sqrt(n_seeds)
    diff = nm - gm
    ok = np.isfinite(diff)
    above = int((diff[ok] > 2 * se[ok]).sum())
    below = int((diff[ok] < -2 * se[ok]).sum())
    n = int(ok.sum())
    if n and above > n / 2:
        verdict = CONFIRMED
    elif n and below > n / 2:
        verdict = NOT_CONFIRMED
    else:
        verdict = UNCLEAR
    mid = int(np.argmin(np.abs(eps - 0.5)))
    text = (
        f"At ε={eps[mid]:g} the loss rises by {_fmt(nm[mid])}% (narrow) vs {_fmt(gm[mid])}% (general) of the "
        f"distance to the no-adapter loss. Narrow is less stable beyond 2 standard errors at {above} of {n} noise "
        f"levels, more stable at {below}."
    )
    return {"verdict": verdict, "text": text, "levels_less_stable": above, "levels_more_stable": below, "levels": n}


def reversion_verdict(rev: dict[str, Any], margin: float = 0.05) -> dict[str, Any]:
    """Did the cosine to the general solution rise once the KL term was removed?"""
    cos = _arr(rev["cosine_to_general"])
    cos = cos[np.isfinite(cos)]
    if cos.size < 2:
        return {"verdict": UNCLEAR, "text": "Not enough finite cosines to judge the reversion run."}
    start, end = float(cos[0]), float(cos[-1])
    delta = end - start
    if delta > margin:
        verdict = CONFIRMED
    elif delta <= 0:
        verdict = NOT_CONFIRMED
    else:
        verdict = UNCLEAR
    text = (
        f"Cosine to the general vector went from {start:.3f} to {end:.3f} over {int(rev['steps'][-1])} steps "
        f"without KL ({delta:+.3f}; the bar for 'confirmed' is +{margin})."
    )
    return {"verdict": verdict, "text": text, "start": start, "end": end, "delta": delta}


def _arr(x: Any) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=float)


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.1f}"
