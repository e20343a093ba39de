"""Results that show themselves: compact reprs, `.plot()` figures drawn by the report's code, `dir(em)`."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import em_interp as em
from em_interp.eval.contrastive import ContrastiveResult
from em_interp.geometry.curves import EfficiencyCurve, StabilityCurve
from em_interp.report import figures
from em_interp.training.continuation import Reversion


def _short(text: str, lines: int = 3, chars: int = 400) -> str:
    assert len(text) <= chars and text.count("\n") < lines, text
    return text


def test_dir_lists_lazy_modules():
    names = dir(em)
    for name in ("generate", "geometry", "eval", "directions", "train", "SteeringVector"):
        assert name in names and name in em.__all__
    assert callable(em.generate) and em.geometry.cosine is not None


def test_adapter_and_direction_reprs(tiny):
    vec = em.SteeringVector(tiny, layer=2, init="random", alpha=4.0)
    vec.provenance = {"source": "x" * 300, "lr": 0.001}
    text = _short(repr(vec))
    assert "blocks.2.hook_resid_post" in text and "d_model=64" in text and "norm=4" in text and "lr=" in text
    assert "x" * 40 not in text  # a long value is cut
    lora = em.LoRA(tiny, layer=[0, 1], rank=2, site=["mlp_out", "attn_q"])
    text = _short(repr(lora))
    assert "layers=[0, 1]" in text and "rank=2" in text and f"params={sum(p.numel() for p in lora.parameters())}" in text
    d = em.directions.Direction(torch.randn(64), layer=3, provenance={"method": "mean_diff", "raw_norm": 2.5})
    assert "blocks.3.hook_resid_post" in _short(repr(d)) and "raw_norm=2.5" in repr(d)


def test_trajectory_pca_repr_and_plot():
    g = torch.Generator().manual_seed(0)
    pca = em.geometry.trajectory_pca({"general": torch.randn(6, 50, generator=g), "narrow": torch.randn(4, 50, generator=g)})
    text = _short(repr(pca))
    assert "k=3" in text and "n_params=50" in text and "general: 6 snapshots (steps 0..5)" in text
    fig = pca.plot()
    assert isinstance(fig, go.Figure)
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert set(lines) == {"general", "narrow"}
    np.testing.assert_allclose(lines["general"].x, pca.paths[0][:, 0])
    np.testing.assert_allclose(lines["narrow"].y, pca.paths[1][:, 1])
    # the same figure as the report draws from the study's results section
    assert fig.to_json() == figures.trajectory_pca({"pca": pca.to_dict()}).to_json()


def test_curve_reprs_and_plots():
    eff = EfficiencyCurve(scales=np.array([0.0, 1.0, 2.0]), norms=np.array([0.0, 3.0, 6.0]),
                          losses=np.array([2.0, 1.5, 1.8]), base_loss=2.0, best_scale=1.0, best_norm=3.0, min_loss=1.5)
    assert "min loss 1.5000 at scale 1" in _short(repr(eff))
    fig = eff.plot(name="narrow")
    assert list(fig.data[0].x) == [0.0, 3.0, 6.0] and list(fig.data[0].y) == [2.0, 1.5, 1.8] and fig.data[0].name == "narrow"
    stab = StabilityCurve(eps=np.array([0.1, 0.5]), seeds=[0, 1], losses=np.ones((2, 2)), relative=np.ones((2, 2)),
                          relative_mean=np.array([10.0, 50.0]), relative_sd=np.array([1.0, 2.0]), loss_orig=1.0, loss_base=2.0)
    assert "ε=0.5: 50.0%" in _short(repr(stab))
    assert list(stab.plot().data[0].y) == [10.0, 50.0]
    rev = Reversion(steps=np.array([0, 5]), cosine=np.array([0.2, 0.6]), run=None, cosine_narrow=np.array([1.0, 0.7]))
    assert "0.200 → 0.600" in _short(repr(rev)) and list(rev.plot().data[0].y) == [0.2, 0.6]


def test_cosine_matrix_unpacks_prints_and_plots():
    a = torch.tensor([1.0, 0.0])
    result = em.geometry.cosine_matrix({"a": a, "b": torch.tensor([1.0, 1.0]), "c": -a})
    labels, matrix = result  # still a (labels, matrix) pair
    assert labels == ["a", "b", "c"] and matrix[0, 2] == pytest.approx(-1.0)
    text = _short(repr(result), lines=5)
    assert "-1.000" in text and "0.707" in text
    heat = result.plot().data[0]
    assert list(heat.x) == labels and heat.z[0][2] == pytest.approx(-1.0)


def test_contrastive_result_repr_and_plot():
    stats = {"n": 4, "mean_shift": 0.25, "ci_low": 0.1, "ci_high": 0.4, "mean_base": -0.1, "mean_adapted": 0.15,
             "frac_bad_base": 0.25, "frac_bad_adapted": 0.75}
    res = ContrastiveResult(items=[{}] * 4, domains={"all": stats, "medical": stats}, meta={"model_id": "tiny"})
    text = _short(repr(res))
    assert "4 items, 1 domains" in text and "medical: n=4, shift +0.250 [+0.100, +0.400]" in text and "25% → 75%" in text
    bar = res.plot(name="narrow").data[0]
    assert list(bar.x) == ["all", "medical"] and list(bar.y) == [0.25, 0.25] and bar.name == "narrow"
    assert list(bar.error_y.array) == pytest.approx([0.15, 0.15])


def test_kl_norm_and_transfer_reprs_and_plot():
    from em_interp.directions import TransferResult
    from em_interp.geometry.kl_norm import KLNormCurve

    curve = KLNormCurve(norms=np.array([0.0, 1.0, 2.0]), kl=np.array([0.0, 0.1, 0.5]), kl_random_mean=np.array([0.0, 0.05, 0.2]),
                        kl_random_sd=np.array([0.0, 0.01, 0.02]), kl_random=np.zeros((3, 3)), layer=2, hook="resid_post",
                        n_tokens=40)
    assert "blocks.2.resid_post" in _short(repr(curve)) and "0.5 vs random 0.2" in repr(curve)
    traces = {t.name: t for t in curve.plot().data}
    assert list(traces["trained direction"].y) == [0.0, 0.1, 0.5]
    d = em.directions.Direction(torch.randn(64), layer=1)
    res = TransferResult(loss={"none": 2.0, "steered": 2.5, "ablated": 1.9}, loss_good=None, contrastive=None,
                         direction=d, scale=8.0, layers="all")
    assert "steered 2.5000" in _short(repr(res))
