"""Verdicts on the seed's claims: small pure functions of one number per training seed.

Every claim reduces each seed's narrow/general pair to one paired number; a 95% Student-t interval over the
seeds (N is small, so t rather than a normal or a bootstrap interval) is compared with a practical threshold:

- efficiency: per seed, the mean over ≥ 10 common target norms of L_narrow − L_general (loss on ≥ 100 training
  rows stratified over subtopics). CONFIRMED iff the interval lies above max(0.02 nats, 10% of L_base − L_orig);
  REFUTED iff it lies below 0; else UNCLEAR.
- stability: per seed, the area over the full ε grid of (narrow − general) loss increase under ≥ 10 shared noise
  draws per ε, once relative ((L_pert − L_orig)/(L_base − L_orig)) and once absolute (ΔL). CONFIRMED (REFUTED)
  iff both intervals lie above (below) 0; else UNCLEAR.
- reversion: per seed, the narrow vector continued K steps without KL minus the control continued K steps with
  KL: the rise in cosine to the general vector, and the rise in held-out-domain contrastive shift. CONFIRMED iff
  both intervals lie above 0 and the continued vector's held-out shift reaches ≥ 50% of the general vector's;
  REFUTED iff either interval lies below 0; else UNCLEAR.
- influence: per seed, the mean over equal norms of log(KL_general / KL_narrow) on generic text (≥ 5 random
  directions reported beside). CONFIRMED iff the interval lies above log 1.1 (the general vector's KL at least
  10% larger); REFUTED iff below 0; else UNCLEAR.

A narrowness gate comes first (`narrowness_gate`): when it fails, every verdict is UNCLEAR with its reason.
Sizes below a rule's minimum (seeds, norms, rows, noise draws, ε grid, random directions) make that verdict
UNCLEAR with the reason stated, whatever the interval; smoke-test runs are PLUMBING CHECK (`plumbing`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from em_interp.stats import Interval, bootstrap_ratio, t_interval

CONFIRMED, REFUTED, UNCLEAR, PLUMBING = "CONFIRMED", "REFUTED", "UNCLEAR", "PLUMBING CHECK"
CLAIMS = ("efficiency", "stability", "reversion", "influence")
MIN_SEEDS = 3
EFFICIENCY_MIN_NORMS, EFFICIENCY_MIN_ROWS = 10, 100
EFFICIENCY_FLOOR, EFFICIENCY_FRACTION = 0.02, 0.10
STABILITY_MIN_DRAWS = 10
STABILITY_EPS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the authors' full grid
REVERSION_MIN_SHIFT = 0.5
INFLUENCE_MIN_RANDOM = 5
INFLUENCE_THRESHOLD = math.log(1.1)
GATE_SCALES = (1.0, 2.0)
GATE_OTHER_MAX, GATE_IN_MIN = 0.25, 0.5
IN_DOMAIN = "medical"


@dataclass(frozen=True)
class Verdict:
    """One claim's verdict with what it rests on (the `results.json` layout).

    Attributes:
        verdict: CONFIRMED, REFUTED, UNCLEAR or PLUMBING CHECK.
        estimate: mean over seeds of the per-seed number (None if not measured).
        interval: [low, high], the 95% t-interval of that mean.
        n: training seeds.
        threshold: the bar the interval's low end must clear for CONFIRMED.
        rule: the rule in words.
        reason: why the verdict is what it is (sizes, the gate, which measures disagreed).
        details: further per-claim numbers (e.g. the second measure's interval).
    """

    verdict: str
    estimate: float | None
    interval: list[float | None]
    n: int
    threshold: float
    rule: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """One line: estimate, interval, n, threshold and the reason."""
        lo, hi = self.interval
        est = "n/a" if self.estimate is None else f"{self.estimate:+.4g}"
        ci = "n/a" if lo is None or hi is None else f"[{lo:+.4g}, {hi:+.4g}]"
        return f"estimate {est}, 95% t-interval {ci}, n={self.n} seeds, threshold {self.threshold:.4g}. {self.reason}"


@dataclass(frozen=True)
class Gate:
    """The narrowness gate: is the narrow vector narrow, and does it still do the narrow task?

    Attributes:
        passed: every ratio within its bound.
        reason: which ratio failed (or that all passed), in words.
        other: {"<group>@<scale>": |narrow shift| / general shift} for every other-domain group and scale.
        in_domain: narrow / general in-domain shift at scale 1.
        max_other, min_in: the bounds (0.25, 0.5).
        intervals: {"<group>@<scale>": [low, high]} 95% bootstrap intervals over seeds of each ratio (in-domain
            under "<in_domain>@1"; see `gate_intervals`), where the seeds' shifts were given; they show how far a
            ratio is from its bound in the seeds' own spread, and do not change `passed`.
    """

    passed: bool
    reason: str
    other: dict[str, float | None]
    in_domain: float | None
    max_other: float = GATE_OTHER_MAX
    min_in: float = GATE_IN_MIN
    intervals: dict[str, list[float | None]] = field(default_factory=dict)


def gate_intervals(general: Sequence[Mapping[float, Mapping[str, float]]], narrow: Sequence[Mapping[float, Mapping[str, float]]],
                   in_domain: str = IN_DOMAIN, n_boot: int = 2000, seed: int = 0) -> dict[str, list[float | None]]:
    """95% paired bootstrap intervals over seeds of the gate's ratios (`stats.bootstrap_ratio`: seed i's narrow
    and general shifts resampled together; other domains as |narrow| / general at each scale, the in-domain group
    as narrow / general at scale 1).

    Args:
        general, narrow: per seed, {scale: {group: mean contrastive shift}} (seed i at index i in both).
        in_domain: the in-domain group's name.
        n_boot: resamples; seed: their seed.

    Returns:
        {"<group>@<scale>": [low, high]} ([None, None] where the ratio is not defined often enough).
    """
    if len(general) != len(narrow):
        raise ValueError(f"gate_intervals: {len(general)} general seeds but {len(narrow)} narrow ones.")
    out: dict[str, list[float | None]] = {}
    for scale in GATE_SCALES:
        groups = [g for g in (general[0].get(scale, {}) if general else {}) if str(g).startswith("other")]
        for group in groups + ([in_domain] if scale == 1.0 else []):
            n = [s[scale][group] for s in narrow]
            g = [s[scale][group] for s in general]
            ci = bootstrap_ratio(n, g, absolute=group != in_domain, n_boot=n_boot, seed=seed)
            out[f"{group}@{scale:g}"] = ci.bounds
    return out


def decide(interval: Interval, threshold: float) -> str:
    """CONFIRMED iff the interval lies above `threshold`, REFUTED iff it lies below 0, else UNCLEAR."""
    if interval.low is None or interval.high is None:
        return UNCLEAR
    if interval.low > threshold:
        return CONFIRMED
    if interval.high < 0:
        return REFUTED
    return UNCLEAR


def _verdict(interval: Interval, threshold: float, rule: str, short: list[str], **details: Any) -> Verdict:
    word = decide(interval, threshold)
    reason = _interval_reason(interval, threshold, word)
    if short:
        word, reason = UNCLEAR, "Sizes below the rule's minimum: " + "; ".join(short) + ". " + reason
    return Verdict(word, interval.estimate, interval.bounds, interval.n, threshold, rule, reason, details)


def _interval_reason(interval: Interval, threshold: float, word: str) -> str:
    if interval.low is None:
        return f"Fewer than 2 seeds (n={interval.n}): no interval."
    if word == CONFIRMED:
        return f"The interval lies above the threshold {threshold:.4g}."
    if word == REFUTED:
        return "The interval lies below 0."
    return f"The interval does not lie above {threshold:.4g} nor below 0."


def _min(short: list[str], what: str, have: int, need: int) -> None:
    if have < need:
        short.append(f"{what} {have} < {need}")


def efficiency_verdict(gaps: Sequence[float], base_gaps: Sequence[float], *, n_norms: int, n_rows: int) -> Verdict:
    """Is the general solution more efficient (lower loss at equal norm)?

    Args:
        gaps: [n_seeds] per seed, the mean over the common norms of L_narrow − L_general (nats).
        base_gaps: [n_seeds] per seed, L_base − L_orig of the general vector (nats), for the threshold.
        n_norms: common target norms measured.
        n_rows: training rows the loss was measured on.
    """
    ci = t_interval(gaps)
    base = t_interval(base_gaps).estimate or 0.0
    threshold = max(EFFICIENCY_FLOOR, EFFICIENCY_FRACTION * base)
    short: list[str] = []
    _min(short, "seeds", ci.n, MIN_SEEDS)
    _min(short, "norms", n_norms, EFFICIENCY_MIN_NORMS)
    _min(short, "rows", n_rows, EFFICIENCY_MIN_ROWS)
    rule = (f"per seed the mean over {n_norms} common norms of L_narrow − L_general on {n_rows} rows; CONFIRMED iff "
            f"the 95% t-interval lies above max({EFFICIENCY_FLOOR}, {EFFICIENCY_FRACTION:.0%} of L_base − L_orig = "
            f"{base:.4g}); REFUTED iff below 0")
    return _verdict(ci, threshold, rule, short, base_gap=base, n_norms=n_norms, n_rows=n_rows)


def stability_verdict(relative: Sequence[float], absolute: Sequence[float], *, eps: Sequence[float],
                      n_draws: int) -> Verdict:
    """Is the narrow solution less stable under norm-preserving noise? Both measures must agree.

    Args:
        relative: [n_seeds] per seed, area over ε of (narrow − general) relative loss increase (percent · ε).
        absolute: [n_seeds] per seed, area over ε of (narrow − general) absolute loss increase (nats · ε).
        eps: the ε grid measured.
        n_draws: noise draws per ε (shared by narrow and general).
    """
    rel, ab = t_interval(relative), t_interval(absolute)
    w_rel, w_abs = decide(rel, 0.0), decide(ab, 0.0)
    short: list[str] = []
    _min(short, "seeds", rel.n, MIN_SEEDS)
    _min(short, "noise draws per ε", n_draws, STABILITY_MIN_DRAWS)
    missing = [e for e in STABILITY_EPS if not any(math.isclose(e, x) for x in eps)]
    if missing:
        short.append(f"ε grid lacks {missing}")
    rule = ("per seed the area over ε of (narrow − general) loss increase, relative and absolute; CONFIRMED iff both "
            "95% t-intervals lie above 0, REFUTED iff both lie below 0")
    word = w_rel if w_rel == w_abs else UNCLEAR
    reason = (f"Relative: {w_rel}; absolute ΔL: {w_abs} (interval {_ci(ab)})."
              + ("" if w_rel == w_abs else " The two measures disagree."))
    if short:
        word, reason = UNCLEAR, "Sizes below the rule's minimum: " + "; ".join(short) + ". " + reason
    return Verdict(word, rel.estimate, rel.bounds, rel.n, 0.0, rule, reason,
                   {"absolute_estimate": ab.estimate, "absolute_interval": ab.bounds, "n_draws": n_draws,
                    "eps": [float(e) for e in eps]})


def reversion_verdict(cosine_rise: Sequence[float], shift_rise: Sequence[float], shift_ratio: Sequence[float], *,
                      steps: int) -> Verdict:
    """Without KL, does the narrow solution move toward the general one (against a KL-on control)?

    Args:
        cosine_rise: [n_seeds] cos(no-KL continuation, general) − cos(KL control, general).
        shift_rise: [n_seeds] held-out-domain contrastive shift of the no-KL continuation minus the control's.
        shift_ratio: [n_seeds] held-out-domain shift of the no-KL continuation / the general vector's.
        steps: K, the continuation's steps.
    """
    cos, shift, ratio = t_interval(cosine_rise), t_interval(shift_rise), t_interval(shift_ratio)
    w_cos, w_shift = decide(cos, 0.0), decide(shift, 0.0)
    reached = ratio.estimate is not None and ratio.estimate >= REVERSION_MIN_SHIFT
    if REFUTED in (w_cos, w_shift):
        word = REFUTED
    elif w_cos == w_shift == CONFIRMED and reached:
        word = CONFIRMED
    else:
        word = UNCLEAR
    short: list[str] = []
    _min(short, "seeds", cos.n, MIN_SEEDS)
    reason = (f"Cosine rise {w_cos}; held-out shift rise {w_shift} (interval {_ci(shift)}); the continued vector's "
              f"held-out shift is {_num(ratio.estimate)} of the general vector's (needs ≥ {REVERSION_MIN_SHIFT:.0%}).")
    if short:
        word, reason = UNCLEAR, "Sizes below the rule's minimum: " + "; ".join(short) + ". " + reason
    rule = (f"per seed, narrow continued {steps} steps without KL minus the same with KL: rise in cosine to general "
            f"and in held-out-domain shift; CONFIRMED iff both 95% t-intervals lie above 0 and the held-out shift "
            f"reaches ≥ {REVERSION_MIN_SHIFT:.0%} of general's; REFUTED iff either lies below 0")
    return Verdict(word, cos.estimate, cos.bounds, cos.n, 0.0, rule, reason,
                   {"shift_rise_estimate": shift.estimate, "shift_rise_interval": shift.bounds,
                    "shift_ratio_estimate": ratio.estimate, "steps": steps})


def influence_verdict(log_ratios: Sequence[float], *, n_random: int, random_log_ratio: float | None = None) -> Verdict:
    """Does the general vector disturb generic text more than the narrow one at equal norm?

    Args:
        log_ratios: [n_seeds] per seed, the mean over norms of log(KL_general / KL_narrow).
        n_random: random directions measured beside them.
        random_log_ratio: mean over seeds and norms of log(KL_general / KL_random), for the report.
    """
    ci = t_interval(log_ratios)
    short: list[str] = []
    _min(short, "seeds", ci.n, MIN_SEEDS)
    _min(short, "random directions", n_random, INFLUENCE_MIN_RANDOM)
    rule = ("per seed the mean over equal norms of log(KL_general / KL_narrow) on generic text; CONFIRMED iff the "
            "95% t-interval lies above log 1.1, REFUTED iff below 0")
    return _verdict(ci, INFLUENCE_THRESHOLD, rule, short, n_random=n_random, random_log_ratio=random_log_ratio)


def narrowness_gate(general: Mapping[float, Mapping[str, float]], narrow: Mapping[float, Mapping[str, float]],
                    in_domain: str = IN_DOMAIN) -> Gate:
    """Check the narrow vector is narrow (other domains ≤ 25% of general's) and still works (own domain ≥ 50%).

    Args:
        general: {scale: {group: mean contrastive shift}} of the general vector (mean over seeds), with scales
            1 and 2; groups are the in-domain one and groups whose name starts with "other".
        narrow: the same for the narrow vector.
        in_domain: the in-domain group's name.

    Returns:
        A `Gate`; it fails (with the reason) when a ratio is out of bounds or cannot be formed (a general
        shift ≤ 0 or a missing group or scale).
    """
    problems: list[str] = []
    other: dict[str, float | None] = {}
    for scale in GATE_SCALES:
        g, n = general.get(scale), narrow.get(scale)
        if g is None or n is None:
            problems.append(f"scale {scale:g} not measured")
            continue
        groups = [k for k in g if str(k).startswith("other")]
        if not groups:
            problems.append(f"no other-domain group at scale {scale:g}")
        for group in groups:
            key = f"{group}@{scale:g}"
            ratio = _ratio(abs(n.get(group, math.nan)), g[group])
            other[key] = ratio
            if ratio is None:
                problems.append(f"{key}: the general shift {_num(g[group])} is not positive, so no ratio")
            elif ratio > GATE_OTHER_MAX:
                problems.append(f"{key}: narrow/general = {ratio:.3f} > {GATE_OTHER_MAX}")
    g1, n1 = general.get(1.0, {}), narrow.get(1.0, {})
    in_ratio = _ratio(n1.get(in_domain, math.nan), g1.get(in_domain, math.nan))
    if in_ratio is None:
        problems.append(f"{in_domain}@1: no ratio (general shift {_num(g1.get(in_domain))})")
    elif in_ratio < GATE_IN_MIN:
        problems.append(f"{in_domain}@1: narrow/general = {in_ratio:.3f} < {GATE_IN_MIN}")
    reason = ("Narrowness gate passed: other-domain ratios " + ", ".join(f"{k} {v:.3f}" for k, v in other.items()
              if v is not None) + f"; in-domain ratio {_num(in_ratio)}.") if not problems else \
        "Narrowness gate failed: " + "; ".join(problems) + "."
    return Gate(not problems, reason, other, in_ratio)


def apply_gate(gate: Gate, verdicts: Mapping[str, Verdict]) -> dict[str, Verdict]:
    """Every verdict UNCLEAR (numbers kept) with the gate's reason when the gate failed; else unchanged."""
    if gate.passed:
        return dict(verdicts)
    return {k: dataclasses.replace(v, verdict=UNCLEAR, reason=f"{gate.reason} {v.reason}") for k, v in verdicts.items()}


def plumbing(verdicts: Mapping[str, Verdict]) -> dict[str, Verdict]:
    """Smoke-test sizes: every verdict becomes PLUMBING CHECK (the numbers only show the code ran)."""
    why = "Smoke-test sizes (--fast): the numbers show the code ran; they support no conclusion."
    return {k: dataclasses.replace(v, verdict=PLUMBING, reason=why) for k, v in verdicts.items()}


def not_measured(claim: str, error: str) -> Verdict:
    """The verdict of a claim whose analysis failed or was not run."""
    return Verdict(UNCLEAR, None, [None, None], 0, math.nan, claim, f"Not measured ({error}).")


def _ratio(num: float, den: float) -> float | None:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


def _ci(ci: Interval) -> str:
    return "n/a" if ci.low is None or ci.high is None else f"[{ci.low:+.4g}, {ci.high:+.4g}]"


def _num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"
