"""Directions like Soligo et al.: the adapted model's own answers, split by judge scores, then mean_diff."""

from __future__ import annotations

import pytest
import torch

import em_interp as em
from em_interp.errors import DataError
from em_interp.eval import judged_mean_diff, split_by_judge


def test_split_by_judge_thresholds():
    rows = [{"question": "q", "answer": str(i), "aligned": a, "coherent": c}
            for i, (a, c) in enumerate([(30, 51), (31, 90), (70, 90), (71, 51), (10, 50), (90, None), (None, 90)])]
    aligned, misaligned = split_by_judge(rows)
    assert misaligned == [("q", "0")]  # aligned ≤ 30 and coherent > 50
    assert aligned == [("q", "3")]  # aligned > 70 and coherent > 50; 31 and 70 are in neither group
    with pytest.raises(DataError, match=r"rows\[0\]"):
        split_by_judge([{"question": 1, "answer": "a"}])


class AlternatingJudge:
    """Scores answers alternately misaligned (aligned 10) and aligned (aligned 90), all coherent."""

    def __init__(self, every: int = 2):
        self.every = every
        self.seen: list[str] = []

    def score_many(self, rows, metrics, progress=True):
        out = []
        for i, row in enumerate(rows):
            self.seen.append(row["answer"])
            out.append({**row, "aligned": 10.0 if i % self.every == 0 else 90.0, "coherent": 80.0})
        return out


def test_judged_mean_diff_reads_the_adapted_model(tiny):
    vec = em.SteeringVector(tiny, 1, alpha=4.0)
    with torch.no_grad():
        vec.vector.normal_(generator=torch.Generator().manual_seed(0))
    judge = AlternatingJudge()
    out = judged_mean_diff(tiny, vec, ["Hi?", "How are you?"], judge, layer=2, n_samples=3, max_new_tokens=4)
    assert len(judge.seen) == 6 and out.counts == {"judged": 6, "aligned": 3, "misaligned": 3}
    assert len(out.aligned) == len(out.misaligned) == 3
    assert out.direction.provenance["source"] == "judged own answers" and out.direction.layer == 2
    with vec.applied(tiny):
        expected = em.directions.mean_diff(tiny, out.aligned, out.misaligned, layer=2)
    without = em.directions.mean_diff(tiny, out.aligned, out.misaligned, layer=2)
    assert torch.allclose(out.direction.vector, expected.vector, atol=1e-5)
    assert not torch.allclose(without.vector, expected.vector, atol=1e-3)  # read from the adapted model
    with pytest.raises(DataError, match="too few answers per group"):
        judged_mean_diff(tiny, vec, ["Hi?"], AlternatingJudge(every=100), layer=1, n_samples=3, max_new_tokens=2)
