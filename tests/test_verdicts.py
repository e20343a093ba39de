"""The verdict rules on synthetic per-seed numbers, the narrowness gate, and the interval helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from em_interp.errors import DataError
from em_interp.stats import bootstrap_interval, bootstrap_ratio, t_interval
from em_interp.study import verdicts as V

FULL = dict(n_norms=10, n_rows=100)
DRAWS = dict(eps=V.STABILITY_EPS, n_draws=10)


def test_t_interval_matches_the_formula():
    ci = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t_{0.975, 3}
    assert ci.estimate == pytest.approx(2.5) and ci.n == 4 and ci.method == "t"
    assert ci.low == pytest.approx(2.5 - half) and ci.high == pytest.approx(2.5 + half)
    assert t_interval([1.0]).low is None and t_interval([]).estimate is None
    with pytest.raises(DataError, match="finite"):
        t_interval([1.0, float("nan")])


def test_cluster_bootstrap_is_wider_than_rowwise_when_clusters_differ():
    flags = [1.0] * 10 + [0.0] * 10 + [1.0] * 10 + [0.0] * 10  # four questions, all-or-nothing
    questions = [q for q in range(4) for _ in range(10)]
    rows = bootstrap_interval(flags, seed=1)
    clustered = bootstrap_interval(flags, questions, seed=1)
    assert clustered.n == 4 and rows.n == 40 and clustered.estimate == rows.estimate == 0.5
    assert clustered.high - clustered.low > 2 * (rows.high - rows.low)
    with pytest.raises(DataError, match="cluster labels"):
        bootstrap_interval([1.0, 0.0], [1])


def test_efficiency_tiny_uniform_gap_is_unclear():
    v = V.efficiency_verdict([0.001, 0.0011, 0.0009, 0.001], [0.5] * 4, **FULL)
    assert v.interval[0] > 0 and v.verdict == V.UNCLEAR  # a consistent but tiny gap is not an effect
    assert v.threshold == pytest.approx(0.05)  # max(0.02, 10% of 0.5)


def test_efficiency_clear_effect_confirmed_and_reversed_refuted():
    assert V.efficiency_verdict([0.3, 0.35, 0.28, 0.32], [0.5] * 4, **FULL).verdict == V.CONFIRMED
    refuted = V.efficiency_verdict([-0.3, -0.35, -0.28, -0.32], [0.5] * 4, **FULL)
    assert refuted.verdict == V.REFUTED and refuted.n == 4 and refuted.interval[1] < 0
    assert V.efficiency_verdict([0.3, -0.3, 0.1], [0.5] * 3, **FULL).verdict == V.UNCLEAR


def test_sizes_below_the_rule_make_it_unclear_with_the_reason():
    v = V.efficiency_verdict([0.3, 0.35, 0.28], [0.5] * 3, n_norms=10, n_rows=24)
    assert v.verdict == V.UNCLEAR and "rows 24 < 100" in v.reason and v.estimate == pytest.approx(0.31)
    v = V.efficiency_verdict([0.3, 0.35], [0.5] * 2, **FULL)
    assert v.verdict == V.UNCLEAR and "seeds 2 < 3" in v.reason
    v = V.stability_verdict([5.0, 6.0, 7.0], [0.1, 0.12, 0.11], eps=(0.1, 0.5, 1.0), n_draws=10)
    assert v.verdict == V.UNCLEAR and "ε grid lacks" in v.reason


def test_stability_needs_relative_and_absolute_to_agree():
    assert V.stability_verdict([5.0, 6.0, 7.0], [0.1, 0.12, 0.11], **DRAWS).verdict == V.CONFIRMED
    assert V.stability_verdict([-5.0, -6.0, -7.0], [-0.1, -0.12, -0.11], **DRAWS).verdict == V.REFUTED
    split = V.stability_verdict([5.0, 6.0, 7.0], [-0.1, -0.12, -0.11], **DRAWS)
    assert split.verdict == V.UNCLEAR and "disagree" in split.reason
    assert split.details["absolute_interval"][1] < 0


def test_reversion_rule():
    ok = V.reversion_verdict([0.2, 0.25, 0.22], [0.3, 0.35, 0.32], [0.7, 0.8, 0.75], steps=10)
    assert ok.verdict == V.CONFIRMED
    weak = V.reversion_verdict([0.2, 0.25, 0.22], [0.3, 0.35, 0.32], [0.2, 0.25, 0.3], steps=10)
    assert weak.verdict == V.UNCLEAR and "needs ≥ 50%" in weak.reason
    assert V.reversion_verdict([-0.2, -0.25, -0.22], [0.3, 0.35, 0.32], [0.7] * 3, steps=10).verdict == V.REFUTED


def test_influence_rule():
    assert V.influence_verdict([0.5, 0.6, 0.55], n_random=5).verdict == V.CONFIRMED
    assert V.influence_verdict([0.05, 0.06, 0.055], n_random=5).verdict == V.UNCLEAR  # < log 1.1
    assert V.influence_verdict([-0.5, -0.6, -0.55], n_random=5).verdict == V.REFUTED
    assert V.influence_verdict([0.5, 0.6, 0.55], n_random=2).verdict == V.UNCLEAR


def _shifts(other: float, medical: float) -> dict[float, dict[str, float]]:
    return {s: {"medical": medical * s, "other (KL domains)": other * s, "other (held-out domains)": other * s}
            for s in V.GATE_SCALES}


def test_gate_passes_and_fails_with_reasons():
    general = _shifts(0.4, 0.5)
    passed = V.narrowness_gate(general, _shifts(0.05, 0.4))
    assert passed.passed and passed.in_domain == pytest.approx(0.8)
    assert passed.other["other (KL domains)@2"] == pytest.approx(0.125)
    wide = V.narrowness_gate(general, _shifts(0.2, 0.4))
    assert not wide.passed and "other (KL domains)@1: narrow/general = 0.500 > 0.25" in wide.reason
    weak = V.narrowness_gate(general, _shifts(0.05, 0.1))
    assert not weak.passed and "medical@1: narrow/general = 0.200 < 0.5" in weak.reason
    flat = V.narrowness_gate(_shifts(-0.1, 0.5), _shifts(0.0, 0.4))
    assert not flat.passed and "not positive" in flat.reason
    assert not V.narrowness_gate({1.0: general[1.0]}, {1.0: general[1.0]}).passed  # scale 2 missing


def test_bootstrap_ratio_of_paired_means():
    same = bootstrap_ratio([0.2, 0.2, 0.2], [0.8, 0.8, 0.8])
    assert same.estimate == pytest.approx(0.25) and same.bounds == pytest.approx([0.25, 0.25])  # no spread
    spread = bootstrap_ratio([0.1, 0.3, 0.2, 0.25], [0.8, 0.9, 0.7, 0.85], seed=3)
    assert spread.estimate == pytest.approx(0.85 / 3.25) and spread.low < spread.estimate < spread.high
    assert spread == bootstrap_ratio([0.1, 0.3, 0.2, 0.25], [0.8, 0.9, 0.7, 0.85], seed=3)  # seeded
    paired = bootstrap_ratio([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])  # numerator tracks denominator
    assert paired.bounds == pytest.approx([0.1, 0.1])  # resampled together, the ratio never moves
    assert bootstrap_ratio([-0.2, -0.2], [0.8, 0.8], absolute=True).estimate == pytest.approx(0.25)
    undefined = bootstrap_ratio([0.1, 0.1, 0.1], [1.0, -1.0, -1.0])
    assert undefined.estimate is None and undefined.bounds == [None, None]
    with pytest.raises(DataError, match="3 numerators but 2 denominators"):
        bootstrap_ratio([1, 2, 3], [1, 2])


def test_gate_intervals_over_seeds_bracket_the_pooled_ratios():
    general = [_shifts(0.4, 0.5), _shifts(0.5, 0.6), _shifts(0.3, 0.4)]
    narrow = [_shifts(0.05, 0.3), _shifts(0.15, 0.35), _shifts(0.08, 0.2)]
    intervals = V.gate_intervals(general, narrow)
    assert set(intervals) == {"other (KL domains)@1", "other (held-out domains)@1", "other (KL domains)@2",
                              "other (held-out domains)@2", "medical@1"}
    mean = lambda seeds, scale, g: float(np.mean([s[scale][g] for s in seeds]))  # noqa: E731
    gate = V.narrowness_gate({s: {g: mean(general, s, g) for g in general[0][s]} for s in V.GATE_SCALES},
                             {s: {g: mean(narrow, s, g) for g in narrow[0][s]} for s in V.GATE_SCALES})
    lo, hi = intervals["medical@1"]
    assert lo < gate.in_domain < hi
    for key, ratio in gate.other.items():
        assert intervals[key][0] <= ratio <= intervals[key][1]
    with pytest.raises(ValueError, match="3 general seeds but 2 narrow"):
        V.gate_intervals(general, narrow[:2])


def test_failed_gate_makes_every_verdict_unclear_and_fast_is_plumbing():
    verdicts = {"efficiency": V.efficiency_verdict([0.3, 0.35, 0.28], [0.5] * 3, **FULL),
                "influence": V.influence_verdict([-0.5, -0.6, -0.55], n_random=5)}
    assert verdicts["efficiency"].verdict == V.CONFIRMED
    gate = V.narrowness_gate(_shifts(0.4, 0.5), _shifts(0.3, 0.4))
    gated = V.apply_gate(gate, verdicts)
    assert {v.verdict for v in gated.values()} == {V.UNCLEAR}
    assert all(v.reason.startswith("Narrowness gate failed") for v in gated.values())
    assert gated["efficiency"].estimate == verdicts["efficiency"].estimate  # numbers kept
    assert V.apply_gate(V.narrowness_gate(_shifts(0.4, 0.5), _shifts(0.05, 0.4)), verdicts) == verdicts
    assert {v.verdict for v in V.plumbing(verdicts).values()} == {V.PLUMBING}


def test_verdict_serialises_to_the_results_layout():
    from em_interp.report import plain

    out = plain(V.efficiency_verdict([0.3, 0.35, 0.28], [0.5] * 3, **FULL))
    assert {"verdict", "estimate", "interval", "n", "threshold", "rule"} <= set(out)
    assert out["n"] == 3 and len(out["interval"]) == 2 and isinstance(out["rule"], str)
    assert math.isfinite(out["threshold"])
