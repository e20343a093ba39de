"""The narrow-vs-general study's own figures and run styles (the generic figures are in `figures`).

These draw sections only the study writes: the cosine of its general/narrow pair over training, the
reversion run, and the mean-difference ablation. `STYLES` gives the study's runs their colours (general
blue, narrow red and dashed so it stays visible where it overlaps general, reversion green); the study page
(`em_interp.report.html.render`) passes them to every figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

from em_interp.report.figures import BASE, _layout, num, nums

STYLES: dict[str, dict[str, str]] = {
    "general": {"color": "#1f77b4"},
    "narrow": {"color": "#d62728", "dash": "dash"},
    "reversion": {"color": "#2ca02c"},
}


def cosine_over_training(results: Mapping[str, Any]) -> go.Figure:
    """Cosine between the general and narrow vectors at each recorded snapshot."""
    cos = results["cosine"]
    y = nums(cos.get("over_training"))
    runs = [r for r in (results.get("training") or {}).values() if isinstance(r, Mapping)]
    steps = nums(runs[0].get("snapshot_steps")) if runs else []  # the pair's first run (the general one)
    x = steps if len(steps) == len(y) else list(range(len(y)))
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines+markers", name="cos(general, narrow)",
                               line=dict(color="#6a3d9a")))
    final = num(cos.get("general_narrow"))
    if math.isfinite(final):
        fig.add_hline(y=final, line_dash="dot", line_color="#6a3d9a",
                      annotation_text=f"final {final:.3f}", annotation_position="bottom right")
    xlabel = "step" if x is steps else "snapshot"
    return _layout(fig, "Cosine between the general and narrow vectors during training", xlabel, "cosine similarity")




def reversion(results: Mapping[str, Any]) -> go.Figure:
    """Cosine of the continued (no-KL) narrow run to the general and to the narrow vector, per step."""
    rev = results["reversion"]
    steps = nums(rev.get("steps"))
    fig = go.Figure()
    for key, label, c in (("cosine_to_general", "cosine to general", STYLES["general"]["color"]),
                          ("cosine_to_narrow", "cosine to narrow (its start)", STYLES["narrow"]["color"])):
        y = nums(rev.get(key))
        if not y:
            continue
        x = steps if len(steps) == len(y) else list(range(len(y)))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, line=dict(color=c)))
    return _layout(fig, "Reversion: the narrow vector trained on without the KL term", "step without KL",
                   "cosine similarity")




def direction_ablation(results: Mapping[str, Any]) -> go.Figure:
    """Loss with no adapter, with the general vector, and with the general vector + mean-diff direction ablated."""
    d = results["direction"]
    labels = ["no adapter", "general", "general + direction ablated"]
    y = [num(d.get("loss_base")), num(d.get("loss_general")), num(d.get("loss_general_ablated"))]
    fig = go.Figure(go.Bar(x=labels, y=y, marker_color=[BASE, STYLES["general"]["color"], "#7fb3e0"],
                           text=[f"{v:.3f}" if math.isfinite(v) else "n/a" for v in y], textposition="outside",
                           hovertemplate="%{x}<br>loss %{y:.4f}<extra></extra>"))
    finite = [v for v in y if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(0.05 * (hi - lo), 0.02 * abs(hi), 1e-3)
        fig.update_yaxes(range=[max(0.0, lo - 3 * pad), hi + 3 * pad])
    return _layout(fig, "Mean-difference direction: loss when it is ablated at every layer", None,
                   "loss on training rows (nats / token)", showlegend=False)
