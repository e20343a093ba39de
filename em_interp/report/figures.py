"""One plotly figure per analysis of any named set of runs (the narrow-vs-general study is one caller).

Every function takes a `results` dict (as built by `em_interp.report.runs_results`, by `em_interp.study`, or
read back from `results.json`) and returns a `plotly.graph_objects.Figure`. Runs appear in the order of
their section; `results["styles"]` (optional) maps a run name to its `color` and `dash`, other runs get
colours from `PALETTE`. The study's own figures (cosine of its pair, reversion, ablation) are in
`em_interp.report.study_figures`. Missing numbers (`None`, as `results.json`
stores NaN) are drawn as gaps; lists and numpy arrays are both accepted. A function raises `KeyError`
when its section is absent; `html.py` checks for the section first and shows a note instead.

The result objects' `.plot()` methods (`TrajectoryPCA`, `EfficiencyCurve`, `StabilityCurve`,
`CosineMatrix`, `ContrastiveResult`) call these same functions with a one-section dict, e.g.
`efficiency({"efficiency": {"narrow": curve_dict}})`, so a notebook and the report draw alike.

>>> fig = efficiency(results)  # doctest: +SKIP
>>> fig.to_html(full_html=False, include_plotlyjs=False)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e")
BASE = "#444444"  # the model without adapter
RANDOM = "#9e9e9e"  # random-direction controls
HEIGHT = 430
Styles = Mapping[str, Mapping[str, str]]


def styles_for(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """One distinct `PALETTE` colour per run name, in order (cycled beyond the palette's length)."""
    return {name: {"color": PALETTE[i % len(PALETTE)]} for i, name in enumerate(names)}


def color(name: str, styles: Styles | None = None) -> str:
    """A run's colour: `styles[name]["color"]`, else one picked from `PALETTE` by the name (stable)."""
    given = (styles or {}).get(name) or {}
    return given.get("color") or PALETTE[sum(map(ord, name)) % len(PALETTE)]


def line(name: str, styles: Styles | None = None) -> dict[str, Any]:
    """Line style for a run: its colour and `styles[name]["dash"]` (solid by default)."""
    dash = ((styles or {}).get(name) or {}).get("dash", "solid")
    return dict(color=color(name, styles), dash=dash, width=2)


def _styles(results: Mapping[str, Any]) -> Styles:
    styles = results.get("styles")
    return styles if isinstance(styles, Mapping) else {}


def num(x: Any) -> float:
    """A number, with `None` and anything non-numeric as NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def nums(xs: Iterable[Any] | None) -> list[float]:
    """A list of numbers (None → NaN); None or a scalar gives an empty / one-element list."""
    if xs is None:
        return []
    if isinstance(xs, (int, float)) or getattr(xs, "ndim", None) == 0:
        return [num(xs)]
    return [num(x) for x in xs]


def _layout(fig: go.Figure, title: str, x: str | None = None, y: str | None = None, **kw: Any) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01), template="plotly_white", height=HEIGHT,
                      margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.18), **kw)
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    return fig


def _runs(section: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, data) for each run of a section, in its order, skipping empty entries."""
    return [(n, v) for n, v in section.items() if isinstance(v, Mapping)]


# --- figures -------------------------------------------------------------------------------------
def training_losses(results: Mapping[str, Any]) -> go.Figure:
    """CE, KL and total loss per optimizer step for each run (three panels)."""
    training, styles = results["training"], _styles(results)
    fig = make_subplots(rows=1, cols=3, subplot_titles=("CE on the training data", "KL on other domains", "Total"))
    for name, run in _runs(training):
        rows = run.get("losses") or []
        steps = [r.get("step", i) if isinstance(r, Mapping) else i for i, r in enumerate(rows)]
        label = name if run.get("kl_coef") is None else f"{name} (λ={num(run['kl_coef']):g})"
        for col, key in enumerate(("ce", "kl", "total"), start=1):
            y = [num(r.get(key)) if isinstance(r, Mapping) else math.nan for r in rows]
            if not any(math.isfinite(v) for v in y):
                continue
            fig.add_trace(go.Scatter(x=steps, y=y, mode="lines", name=label, legendgroup=name, showlegend=col == 1,
                                     line=line(name, styles)), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="nats / token", row=1, col=1)
    return _layout(fig, "Training losses")


def trajectory_pca(results: Mapping[str, Any]) -> go.Figure:
    """Each run's snapshots on the first two principal components, with start (circle) and end (star)."""
    pca, styles = results["pca"], _styles(results)
    paths: Mapping[str, Any] = pca.get("paths") or {}
    steps: Mapping[str, Any] = pca.get("steps") or {}
    names = [n for n in (pca.get("names") or list(paths)) if n in paths]
    fig = go.Figure()
    for name in names:
        pts = [nums(p if hasattr(p, "__len__") else [p]) for p in (paths[name] if paths[name] is not None else [])]
        if not pts:
            continue
        x = [p[0] if p else math.nan for p in pts]
        y = [p[1] if len(p) > 1 else 0.0 for p in pts]
        st = nums(steps.get(name)) if steps.get(name) is not None else list(range(len(pts)))
        text = [f"step {s:g}" for s in st] if len(st) == len(pts) else None
        c = color(name, styles)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name, text=text,
                                 hovertemplate="%{text}<br>PC1 %{x:.3g}<br>PC2 %{y:.3g}<extra>" + name + "</extra>",
                                 line=line(name, styles), marker=dict(size=5)))
        fig.add_trace(go.Scatter(x=x[:1], y=y[:1], mode="markers", name=f"{name} start", legendgroup=name,
                                 showlegend=False, hovertemplate=f"{name} start<extra></extra>",
                                 marker=dict(symbol="circle-open", size=14, color=c, line=dict(width=2))))
        fig.add_trace(go.Scatter(x=x[-1:], y=y[-1:], mode="markers", name=f"{name} end", legendgroup=name,
                                 showlegend=False, hovertemplate=f"{name} end<extra></extra>",
                                 marker=dict(symbol="star", size=16, color=c, line=dict(width=1, color="white"))))
    evr = nums(pca.get("explained_variance_ratio"))
    lab = [f"PC{i + 1}" + (f" ({evr[i]:.0%} of variance)" if i < len(evr) and math.isfinite(evr[i]) else "")
           for i in range(2)]
    return _layout(fig, "Training trajectories in PCA space (○ start, ★ end)", lab[0], lab[1])


def efficiency(results: Mapping[str, Any]) -> go.Figure:
    """Loss against the rescaled vector's norm for both runs, with the no-adapter loss as a line."""
    eff, styles = results["efficiency"], _styles(results)
    fig = go.Figure()
    base = math.nan
    for name, curve in _runs(eff):
        c = color(name, styles)
        fig.add_trace(go.Scatter(x=nums(curve.get("norms")), y=nums(curve.get("losses")), mode="lines+markers",
                                 name=name, legendgroup=name, line=line(name, styles),
                                 hovertemplate="norm %{x:.3g}<br>loss %{y:.4f}<extra>" + name + "</extra>"))
        bx, by = num(curve.get("best_norm")), num(curve.get("min_loss"))
        if math.isfinite(bx) and math.isfinite(by):
            fig.add_trace(go.Scatter(x=[bx], y=[by], mode="markers", name=f"{name} minimum", legendgroup=name,
                                     showlegend=False, marker=dict(symbol="star", size=14, color=c)))
        if not math.isfinite(base):
            base = num(curve.get("base_loss"))
    if math.isfinite(base):
        fig.add_hline(y=base, line_dash="dash", line_color=BASE,
                      annotation_text=f"no adapter {base:.3f}", annotation_position="top right")
    return _layout(fig, "Efficiency: loss vs norm of the rescaled vector (★ minimum)", "norm of the added vector",
                   "loss on training rows (nats / token)")


def stability(results: Mapping[str, Any]) -> go.Figure:
    """Relative loss increase under orthogonal noise of size ε, mean ± sd over seeds."""
    stab, styles = results["stability"], _styles(results)
    fig = go.Figure()
    for name, curve in _runs(stab):
        fig.add_trace(go.Scatter(
            x=nums(curve.get("eps")), y=nums(curve.get("relative_mean")), mode="lines+markers", name=name,
            line=line(name, styles),
            error_y=dict(type="data", array=[0.0 if math.isnan(v) else v for v in nums(curve.get("relative_sd"))],
                         visible=True),
            hovertemplate="ε %{x:g}<br>%{y:.1f}%<extra>" + name + "</extra>"))
    fig.add_hline(y=100, line_dash="dot", line_color=BASE, annotation_text="= no adapter",
                  annotation_position="top left")
    return _layout(fig, "Stability: loss increase under orthogonal noise (mean ± sd over seeds)", "noise level ε",
                   "loss increase (% of gap to no adapter)")


def kl_vs_norm(results: Mapping[str, Any]) -> go.Figure:
    """KL on generic text vs added norm: trained direction against random directions (mean ± sd), per run."""
    kl, styles = results["kl_vs_norm"], _styles(results)
    runs = _runs(kl)
    fig = make_subplots(rows=1, cols=max(1, len(runs)), shared_yaxes=True,
                        subplot_titles=[f"{n} direction" for n, _ in runs] or None)
    for col, (name, curve) in enumerate(runs, start=1):
        x = nums(curve.get("norms"))
        sd = [0.0 if math.isnan(v) else v for v in nums(curve.get("kl_random_sd"))]
        fig.add_trace(go.Scatter(x=x, y=nums(curve.get("kl_random_mean")), mode="lines+markers",
                                 name="random directions (mean ± sd)", legendgroup="random", showlegend=col == 1,
                                 line=dict(color=RANDOM, dash="dot"),
                                 error_y=dict(type="data", array=sd, visible=True)), row=1, col=col)
        fig.add_trace(go.Scatter(x=x, y=nums(curve.get("kl")), mode="lines+markers", name=f"{name} direction",
                                 line=line(name, styles)), row=1, col=col)
    fig.update_xaxes(title_text="norm of the added vector")
    fig.update_yaxes(title_text="KL per token (nats)", row=1, col=1)
    return _layout(fig, "KL on generic text vs norm: trained direction vs random directions")


def contrastive(results: Mapping[str, Any]) -> go.Figure:
    """Mean log-prob shift toward the bad answer per group, with 95% CI error bars, one bar per run."""
    con, styles = results["contrastive"], _styles(results)
    runs = _runs(con)
    groups = list(dict.fromkeys(g for _, stats in runs for g in stats))
    fig = go.Figure()
    for name, stats in runs:
        rows = [stats.get(g) if isinstance(stats.get(g), Mapping) else {} for g in groups]
        mean = [num(r.get("mean_shift")) for r in rows]
        hi = [num(r.get("ci_high")) - m for r, m in zip(rows, mean, strict=True)]
        lo = [m - num(r.get("ci_low")) for r, m in zip(rows, mean, strict=True)]
        extra = [[r.get("n", "?"), num(r.get("prefers_bad"))] for r in rows]
        fig.add_trace(go.Bar(
            x=groups, y=mean, name=name, marker_color=color(name, styles), customdata=extra,
            error_y=dict(type="data", symmetric=False, array=[0.0 if math.isnan(v) else v for v in hi],
                         arrayminus=[0.0 if math.isnan(v) else v for v in lo], visible=True),
            hovertemplate="%{x}<br>shift %{y:.3f}<br>n=%{customdata[0]}, prefers bad %{customdata[1]:.0%}"
                          "<extra>" + name + "</extra>"))
    fig.add_hline(y=0, line_color="#888888", line_width=1)
    return _layout(fig, "Contrastive shift toward the bad answer by group (95% bootstrap CI)", None,
                   "Δ log-prob(bad − good), nats", barmode="group")


def cosine_matrix(results: Mapping[str, Any]) -> go.Figure:
    """Pairwise cosine similarities as a heatmap (`results["cosine_matrix"]`: `labels` and `matrix` [n, n])."""
    cm = results["cosine_matrix"]
    labels = [str(x) for x in cm.get("labels") or []]
    z = [nums(row) for row in cm.get("matrix")] if cm.get("matrix") is not None else []
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                               text=[[f"{v:.3f}" for v in row] for row in z], texttemplate="%{text}",
                               hovertemplate="%{y} · %{x}<br>cos %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Cosine similarity", None, None)


def norms(results: Mapping[str, Any]) -> go.Figure:
    """Each run's adapter norm at its snapshots (`results["norms"][name]`: `steps` and `norms`)."""
    sec, styles = results["norms"], _styles(results)
    fig = go.Figure()
    for name, run in _runs(sec):
        y = nums(run.get("norms"))
        steps = nums(run.get("steps"))
        x = steps if len(steps) == len(y) else list(range(len(y)))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, line=line(name, styles),
                                 hovertemplate="step %{x:g}<br>norm %{y:.4g}<extra>" + name + "</extra>"))
    return _layout(fig, "Adapter norm over training", "step", "norm")
