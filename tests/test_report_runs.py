"""The report for any named runs: `em.report.build` on tiny-model runs; figures without hard-coded run names."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import em_interp as em
from em_interp.errors import ReportError
from em_interp.report import build, figures, runs_results
from em_interp.report.html import RUN_SECTIONS
from em_interp.testing import tiny_chat_records

SETTINGS = dict(lr=1e-2, epochs=2, batch_size=4, kl_batch_size=4, warmup_steps=1, record_every=1, progress=False)


@pytest.fixture(scope="module")
def runs(_tiny_model_cached):
    model = _tiny_model_cached
    data, kl_data = tiny_chat_records(8, seed=1), tiny_chat_records(8, seed=2)
    out = {}
    for name, kl in (("kl=0", 0.0), ("kl=1e3", 1e3)):
        vec = em.SteeringVector(model, layer=1, init="random", seed=3)
        kl_args = {"kl_data": kl_data, "kl_coef": kl} if kl else {}
        out[name] = em.train(vec, model, data, **kl_args, **SETTINGS)
    return out


def _plotly_data(html: str, div_id: str) -> list[dict]:
    """The traces plotly draws into `div_id` (parsed from the page's Plotly.newPlot call)."""
    match = re.search(r'Plotly\.newPlot\(\s*"' + div_id + r'",\s*(\[.*?\]),\s*\{', html, re.S)
    assert match, f"no figure {div_id} in the page"
    return json.loads(match.group(1))


def test_build_draws_every_named_run(runs, tmp_path):
    path = build(runs, tmp_path / "report", title="KL sweep")
    html = path.read_text()
    assert path == tmp_path / "report" / "report.html"
    for name in runs:
        assert name in html
    for s in RUN_SECTIONS:
        assert f'id="{s.div_id}"' in html, s.key
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert list(results["training"]) == list(runs)
    # the figures carry the runs' own numbers
    losses = _plotly_data(html, "fig-training")
    ce = {t["name"]: t["y"] for t in losses if t.get("xaxis", "x") == "x"}
    for name, run in runs.items():
        label = f"{name} (λ={run.config.kl_coef:g})"
        np.testing.assert_allclose(ce[label], [r["ce"] for r in run.losses], rtol=1e-6)
    norms = {t["name"]: t["y"] for t in _plotly_data(html, "fig-norms")}
    for name, run in runs.items():
        assert len(norms[name]) == len(run.snapshot_steps) > 2
        assert norms[name][-1] == pytest.approx(run.adapter.norm, rel=1e-5)
    pca = _plotly_data(html, "fig-pca")
    assert {t["name"] for t in pca if t.get("showlegend", True)} == set(runs)
    cm = _plotly_data(html, "fig-cosine-matrix")[0]
    assert cm["x"] == list(runs)
    np.testing.assert_allclose(np.diag(np.array(cm["z"], dtype=float)), 1.0, atol=1e-9)
    cos = em.geometry.cosine(runs["kl=0"].adapter, runs["kl=1e3"].adapter)
    assert cm["z"][0][1] == pytest.approx(cos, abs=1e-6)


def test_runs_get_distinct_colours_and_the_runs_are_untouched(runs):
    before = {n: r.adapter.flat().clone() for n, r in runs.items()}
    results = runs_results(runs)
    colours = [figures.color(n, results["styles"]) for n in runs]
    assert len(set(colours)) == len(colours)
    for n, r in runs.items():
        assert np.array_equal(r.adapter.flat().numpy(), before[n].numpy())
    assert results["runs"]["kl=1e3"]["kl_coef"] == 1e3 and results["runs"]["kl=0"]["steps"] == len(runs["kl=0"].losses)


def test_figures_draw_any_run_names():
    section = {"losses": [{"step": 1, "ce": 2.0, "kl": 0.1, "total": 2.1}, {"step": 2, "ce": 1.5, "kl": 0.2, "total": 1.7}]}
    fig = figures.training_losses({"training": {"b": section, "a": section}})
    assert [t.name for t in fig.data if t.showlegend] == ["b", "a"]  # the section's order, no preferred names
    assert fig.data[0].line.color != fig.data[3].line.color


def test_build_refuses_what_is_not_runs(tmp_path):
    with pytest.raises(ReportError, match="non-empty dict"):
        build({}, tmp_path / "r")
    with pytest.raises(ReportError, match=r"runs\['x'\] is a str"):
        build({"x": "run"}, tmp_path / "r")
    assert not (tmp_path / "r").exists()
