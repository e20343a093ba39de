"""Page layout of the study report: header, verdict cards, one section per figure, tables.

`render(results)` returns the whole page as one string with plotly.js embedded once, so the file opens
offline. Sections whose results are missing are replaced by a short note; every piece of text that comes
from the results (generations, config values, verdict texts) is HTML-escaped.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html import escape
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from em_interp.report import figures as F
from em_interp.report import study_figures as SF
from em_interp.report.style import CSS

log = logging.getLogger(__name__)

VERDICT_COLORS = {"CONFIRMED": "#1a7f37", "REFUTED": "#c62828", "UNCLEAR": "#b26a00", "PLUMBING CHECK": "#555555"}
CLAIMS = {
    "efficiency": ("Efficiency", "The general solution is more efficient: lower loss at equal norm."),
    "stability": ("Stability", "The general solution is more stable: the narrow one degrades faster under noise."),
    "reversion": ("Reversion", "Without the KL term, the narrow solution moves toward the general one."),
    "influence": ("Influence", "At equal norm the general vector changes generic text more than the narrow one."),
}
STATS_NOTE = (
    "How to read the verdicts: each training seed trains one general and one narrow vector on the seed's own "
    "stratified draw of rows, in the seed's own order; each claim reduces a seed's pair to one number, and the "
    "interval is a 95% Student-t interval of its mean over the seeds (few seeds, so t). A verdict is CONFIRMED "
    "only when the whole interval clears the stated threshold, REFUTED when it lies below 0, UNCLEAR otherwise, "
    "or when the sizes fall below the rule's minimum, or when the narrowness gate failed. With 3 seeds an interval "
    "is wide; UNCLEAR is not evidence against a claim. Figures show seed 0 only.")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass(frozen=True)
class Section:
    """One figure of the report: where its data lives, how to draw it, and what it measures."""

    div_id: str
    title: str
    key: str
    figure: Callable[[Mapping[str, Any]], go.Figure]
    explanation: str


SECTIONS: tuple[Section, ...] = (
    Section("fig-training", "Training losses", "training", F.training_losses,
            "Both steering vectors learn the same bad medical advice: the cross-entropy (CE) is the loss on the "
            "assistant's answers. The narrow vector also pays a penalty λ·KL for changing the model's answers in "
            "other domains (the KL set; see Data for what it holds); the general vector pays none (λ = 0). Falling CE "
            "means a vector fits the bad advice; the KL panel shows how much each one changes the model elsewhere."),
    Section("fig-cosine", "Cosine over training", "cosine", SF.cosine_over_training,
            "The cosine similarity between the general and the narrow vector at the same training step: 1 means "
            "they point the same way, 0 that they are unrelated. If the KL penalty sends the narrow solution "
            "somewhere else, the cosine stays well below 1."),
    Section("fig-pca", "Trajectories (PCA)", "pca", F.trajectory_pca,
            "Every recorded snapshot of the general run, the narrow run and the reversion run (the narrow vector "
            "trained on without KL) is projected onto the two directions along which all snapshots vary most. "
            "Circles mark where a run starts, stars where it ends. A reversion path heading toward the general "
            "path means the narrow solution was held in place only by the KL term."),
    Section("fig-efficiency", "Efficiency", "efficiency", F.efficiency,
            "Both trained vectors of seed 0 are rescaled to the same norms (0.2 to 2 times their mean trained norm) "
            "and the loss on training rows (stratified over subtopics) is measured at each. A more efficient "
            "solution reaches a lower loss at the same norm. The dashed line is the model with no adapter; stars "
            "mark each curve's minimum. The verdict uses every seed's mean gap over these norms."),
    Section("fig-stability", "Stability", "stability", F.stability,
            "Each vector x is mixed with random noise y of the same length at right angles to it: "
            "x' = √(1−ε²)·x + ε·y. The y axis is how much the loss rises, as a percentage of the gap between the "
            "trained vector's loss and the no-adapter loss (0% = unaffected, 100% = as bad as no adapter). "
            "Error bars are the standard deviation over noise draws (the same draws for both vectors; noise draws "
            "are not training seeds). A steeper curve is a less stable solution. The verdict uses every seed's "
            "area under the narrow − general difference, relative and absolute."),
    Section("fig-reversion", "Reversion", "reversion", SF.reversion,
            "The narrow vector is trained on, on the same bad medical data, but without the KL penalty. The lines "
            "show its cosine to the final general vector and to the narrow vector it started from. A rising "
            "cosine to the general vector means that, once free, the narrow solution drifts toward the general one."),
    Section("fig-kl-norm", "KL on generic text vs norm", "kl_vs_norm", F.kl_vs_norm,
            "The trained direction (made unit length) is added to the residual stream at several norms while "
            "the model reads generic prose, and the KL divergence from the unmodified model is measured per "
            "token. Grey: random directions at the same norms (mean ± sd). A direction that disturbs ordinary "
            "text more than random ones acts generally; one that disturbs it less acts narrowly."),
    Section("fig-contrastive", "Contrastive shifts by group", "contrastive", F.contrastive,
            "A judge-free test: for questions with a good and a bad answer, how much more log-probability the "
            "adapted model gives the bad answer than the good one, minus the same for the model without adapter "
            "(positive = pushed toward the bad answer). Groups: medical training topics, held-out medical "
            "topics, the domains of the KL data, and domains seen by neither. Error bars: 95% bootstrap "
            "intervals. A narrow vector should shift the medical groups but not the others."),
    Section("fig-direction", "Mean-difference direction and ablation", "direction", SF.direction_ablation,
            "A direction is extracted as the mean residual on bad medical answers minus that on good ones at the "
            "study layer, then projected out at every layer while the general vector is applied. If removing it "
            "brings the loss back toward the no-adapter value, the general vector works largely through it."),
)


def render(results: Mapping[str, Any], title: str = "em_interp — narrow vs general study") -> str:
    """The whole report page as an HTML string.

    Args:
        results: the study's results dict (plain JSON values; None for missing numbers).
        title: the page title.

    Returns:
        A self-contained HTML document (plotly.js inlined once, no external resources).
    """
    results = {"styles": SF.STYLES, **results}  # the study's run colours unless the results name their own
    parts = [_header(results, title), _verdicts(results.get("verdicts"), results.get("seeds")),
             _gate(results.get("gate")), _contents(results), _data(results.get("data")),
             _per_seed(results.get("per_seed"))]
    parts += [_section(s, results) for s in SECTIONS]
    parts += [_generations(results.get("generations")), _timings(results.get("timings")),
              _config(results.get("config"))]
    return _page(title, "\n".join(parts))


RUN_SECTIONS: tuple[Section, ...] = (
    Section("fig-training", "Training losses", "training", F.training_losses,
            "Cross-entropy on each run's training data, the KL term (zero for runs without one) and their "
            "weighted total, per optimizer step."),
    Section("fig-norms", "Adapter norm", "norms", F.norms,
            "The norm of each run's adapter at its recorded snapshots (steering: ‖alpha·v‖; LoRA: mean ‖ΔW‖_F)."),
    Section("fig-pca", "Trajectories (PCA)", "pca", F.trajectory_pca,
            "Every recorded snapshot of every run, projected onto the two directions along which all snapshots "
            "vary most (one PCA fitted on all runs). Circles mark where a run starts, stars where it ends."),
    Section("fig-cosine-matrix", "Cosine between the final adapters", "cosine_matrix", F.cosine_matrix,
            "Cosine similarity of the runs' final adapters (steering: the vectors; LoRA: the concatenated ΔW). "
            "1: the same direction; 0: unrelated."),
)


def render_runs(results: Mapping[str, Any], title: str = "em_interp — runs") -> str:
    """The report page for any named set of runs (see `em_interp.report.build`) as an HTML string.

    Args:
        results: `em_interp.report.runs_results(...)` (plain JSON values; None for missing numbers).
        title: the page title.

    Returns:
        A self-contained HTML document (plotly.js inlined once, no external resources).
    """
    links = [f"<a href=\"#{s.div_id}-section\">{escape(s.title)}</a>" for s in RUN_SECTIONS]
    parts = [f"<header><h1>{escape(title)}</h1></header>", _runs_table(results.get("runs")),
             f"<nav>{' · '.join(links)}</nav>"]
    parts += [_section(s, results) for s in RUN_SECTIONS]
    return _page(title, "\n".join(parts))


def _runs_table(runs: Any) -> str:
    if not isinstance(runs, Mapping) or not runs:
        return _note_section("runs", "Runs", "No runs in these results.")
    cols = ["kind", "steps", "final ce", "final kl", "norm", "lr", "kl_coef", "seed", "wall time (s)"]
    head = "".join(f"<th>{escape(c)}</th>" for c in ["run", *cols])
    rows = "".join("<tr>" + f"<td>{escape(str(name))}</td>" + "".join(f"<td>{escape(_fmt(r.get(c)))}</td>" for c in cols)
                   + "</tr>" for name, r in runs.items() if isinstance(r, Mapping))
    return (f"<section id=\"runs\"><h2>Runs</h2><table class=\"small\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table></section>")


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{escape(title)}</title>\n<link rel=\"icon\" href=\"data:,\">\n<style>{CSS}</style>\n"
        "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        "<footer>Written by em_interp. Everything on this page, plotly.js included, is inside this one file; "
        "it opens offline.</footer>\n</body>\n</html>\n"
    )


# --- pieces --------------------------------------------------------------------------------------
def _header(results: Mapping[str, Any], title: str) -> str:
    env = results.get("environment") or {}
    cfg = results.get("config") or {}
    model = env.get("model", "?")
    device = env.get("device", "?")
    if env.get("cuda") and "cuda" in str(device):
        device = f"{device} ({env['cuda']})"
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    adapter = {"lora": "rank-1 LoRA on the MLP down-projection (rsLoRA); \"vector\" below means this adapter",
               "vector": "steering vector (added to the residual stream)"}.get(cfg.get("adapter", "vector"), "?")
    facts = [("model", model), ("device", device), ("adapter", adapter),
             ("layer", results.get("layer", cfg.get("layer", "?"))),
             ("date", results["date"]) if results.get("date") else ("report written", now)]
    versions = ", ".join(f"{k} {env[k]}" for k in ("em_interp", "torch", "transformers", "transformer_lens", "python")
                         if env.get(k))
    if versions:
        facts.append(("versions", versions))
    lr = ("lora_lr", "lora_alpha") if cfg.get("adapter") == "lora" else ("lr", "alpha")
    keys = ("seeds", "n_train", "n_kl", "epochs", "batch_size", "kl_batch_size", *lr, "kl_coef", "lora", "seed")
    summary = ", ".join(f"{k}={_fmt(cfg[k])}" for k in keys if cfg.get(k) is not None)
    if summary:
        facts.append(("config", summary))
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts)
    return f"<header><h1>{escape(title)}</h1><table class=\"meta\">{rows}</table></header>"


def _verdicts(verdicts: Any, seeds: Any = None) -> str:
    if not isinstance(verdicts, Mapping) or not verdicts:
        return _note_section("verdicts", "Verdicts", "No verdicts in these results (the study did not finish).")
    cards = []
    for key in list(CLAIMS) + [k for k in verdicts if k not in CLAIMS]:
        v = verdicts.get(key)
        if not isinstance(v, Mapping):
            continue
        name, claim = CLAIMS.get(key, (key.title(), ""))
        word = str(v.get("verdict", "UNCLEAR"))
        col = VERDICT_COLORS.get(word, "#555555")
        cards.append(
            f"<div class=\"card\" id=\"verdict-{escape(key)}\" style=\"border-top-color:{col}\">"
            f"<div class=\"claim\">{escape(name)}</div><div class=\"claimtext\">{escape(claim)}</div>"
            f"<div class=\"verdict\" style=\"color:{col}\">{escape(word)}</div>"
            f"<p>{escape(_verdict_numbers(v))}</p><p>{escape(str(v.get('reason', v.get('text', ''))))}</p>"
            f"<p class=\"rule\">Rule: {escape(str(v.get('rule', '')))}</p></div>"
        )
    n = f" ({seeds} training seeds per condition)" if seeds else ""
    return (f"<section id=\"verdicts\"><h2>Verdicts{escape(n)}</h2><p class=\"explain\">{escape(STATS_NOTE)}</p>"
            f"<div class=\"cards\">{''.join(cards)}</div></section>")


def _verdict_numbers(v: Mapping[str, Any]) -> str:
    if "estimate" not in v:
        return ""
    lo, hi = (list(v.get("interval") or []) + [None, None])[:2]
    ci = "n/a" if lo is None or hi is None else f"[{F.num(lo):+.4g}, {F.num(hi):+.4g}]"
    est = v.get("estimate")
    est_s = "n/a" if est is None else f"{F.num(est):+.4g}"
    return f"Estimate {est_s}, 95% t-interval {ci}, n={v.get('n')} seeds, threshold {_fmt(v.get('threshold'))}."


def _gate(gate: Any) -> str:
    if not isinstance(gate, Mapping):
        return _note_section("gate", "Narrowness gate", "The gate was not measured in these results.")
    word = "passed" if gate.get("passed") else "FAILED"
    ratios = dict(gate.get("other") or {})
    intervals = dict(gate.get("intervals") or {})

    def interval(key: str) -> str:
        lo, hi = intervals.get(key) or (None, None)
        return "" if lo is None or hi is None else f"[{_fmt(lo, 3)}, {_fmt(hi, 3)}]"

    rows = "".join(f"<tr><td>{escape(str(k))}</td><td class=\"num\">{_fmt(r, 3)}</td><td class=\"num\">{interval(k)}</td>"
                   f"<td>≤ {_fmt(gate.get('max_other'))}</td></tr>" for k, r in ratios.items())
    rows += (f"<tr><td>medical@1 (in-domain)</td><td class=\"num\">{_fmt(gate.get('in_domain'), 3)}</td>"
             f"<td class=\"num\">{interval('medical@1')}</td><td>≥ {_fmt(gate.get('min_in'))}</td></tr>")
    return (f"<section id=\"gate\"><h2>Narrowness gate: {word}</h2><p class=\"explain\">Before any verdict: the "
            f"narrow vector's contrastive shift on other domains must be at most 25% of the general vector's at "
            f"scale 1 and 2 (it is narrow), and on its own domain at least 50% (it still does the task). Ratios are "
            f"narrow / general of the mean shift over seeds; beside each, a 95% bootstrap interval over seeds (seed i's "
            f"narrow and general resampled together), which shows the seeds' spread and does not change the gate."
            f"</p><p>{escape(str(gate.get('reason', '')))}</p>"
            f"<table class=\"small\"><thead><tr><th>group@scale</th><th>narrow / general</th><th>95% over seeds</th>"
            f"<th>bound</th></tr>"
            f"</thead><tbody>{rows}</tbody></table></section>")


def _data(data: Any) -> str:
    if not isinstance(data, Mapping):
        return ""
    sets = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    rows = ""
    for label, content in sets.items():
        for name, counts in content.items():
            held = ", ".join(f"{k} {c}" for k, c in counts.items()) if isinstance(counts, Mapping) else str(counts)
            rows += f"<tr><td>{escape(label)}: {escape(str(name))}</td><td>{escape(held)}</td></tr>"
    note = escape(str(data.get("note", "")))
    return (f"<section id=\"data\"><h2>Data</h2><p class=\"explain\">What each set holds, counted from the rows "
            f"themselves. {note}</p><table class=\"small\"><tbody>{rows}</tbody></table></section>")


def _per_seed(per_seed: Any) -> str:
    if not isinstance(per_seed, list) or not per_seed:
        return ""
    cols = ("efficiency_gap", "base_gap", "stability_relative", "stability_absolute", "cosine_rise", "shift_rise",
            "shift_ratio", "influence_log_ratio", "random_log_ratio")
    head = "".join(f"<th>{escape(c)}</th>" for c in ("seed", *cols))
    body = "".join("<tr>" + f"<td>{escape(str(p.get('seed')))}</td>" +
                   "".join(f"<td class=\"num\">{_fmt(p.get(c), 3)}</td>" for c in cols) + "</tr>"
                   for p in per_seed if isinstance(p, Mapping))
    return (f"<section id=\"per-seed\"><h2>Per-seed numbers</h2><p class=\"explain\">The paired numbers the verdicts "
            f"rest on (narrow − general unless named otherwise; efficiency in nats, stability areas in %·ε and "
            f"nats·ε, influence as log KL ratios).</p><div class=\"scroll\"><table class=\"small\"><thead><tr>{head}"
            f"</tr></thead><tbody>{body}</tbody></table></div></section>")


def _contents(results: Mapping[str, Any]) -> str:
    links = ["<a href=\"#gate\">Narrowness gate</a>", "<a href=\"#data\">Data</a>",
             "<a href=\"#per-seed\">Per seed</a>"]
    links += [f"<a href=\"#{s.div_id}-section\">{escape(s.title)}</a>" for s in SECTIONS]
    links += ["<a href=\"#generations\">Generations</a>", "<a href=\"#timings\">Timings</a>",
              "<a href=\"#config\">Configuration</a>"]
    return f"<nav>{' · '.join(links)}</nav>"


def _section(s: Section, results: Mapping[str, Any]) -> str:
    sid = f"{s.div_id}-section"
    if not results.get(s.key):
        return _note_section(sid, s.title, f"Not in these results (no “{s.key}” section); skipped.", s.explanation)
    try:
        fig = s.figure(results)
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=s.div_id, config=PLOT_CONFIG,
                          default_width="100%", default_height=f"{F.HEIGHT}px")
    except Exception as exc:  # a malformed section must not cost the rest of the report
        log.warning("report: could not draw %s: %s: %s", s.key, type(exc).__name__, exc)
        return _note_section(sid, s.title, f"Could not draw this figure ({type(exc).__name__}: {exc}).", s.explanation)
    facts = _facts(s.key, results)
    facts_html = f"<p class=\"facts\">{escape(facts)}</p>" if facts else ""
    return (f"<section id=\"{sid}\"><h2>{escape(s.title)}</h2><p class=\"explain\">{escape(s.explanation)}</p>"
            f"{facts_html}<div class=\"figure\">{div}</div></section>")


def _note_section(sid: str, title: str, note: str, explanation: str = "") -> str:
    expl = f"<p class=\"explain\">{escape(explanation)}</p>" if explanation else ""
    return f"<section id=\"{sid}\"><h2>{escape(title)}</h2>{expl}<p class=\"note\">{escape(note)}</p></section>"


def _facts(key: str, results: Mapping[str, Any]) -> str:
    """A one-line summary of the section's key numbers ('' when there is nothing to add)."""
    sec = results.get(key) or {}
    if key == "training":
        return "; ".join(
            f"{n}: final CE {_fmt((r.get('losses') or [{}])[-1].get('ce'))}, KL "
            f"{_fmt((r.get('losses') or [{}])[-1].get('kl'))}, norm {_fmt(r.get('norm'))}, "
            f"{_fmt(r.get('wall_time'))} s" for n, r in F._runs(sec))
    if key == "cosine":
        return f"Final cosine between the general and narrow vectors: {_fmt(sec.get('general_narrow'))}."
    if key == "pca":
        evr = F.nums(sec.get("explained_variance_ratio"))
        return "Explained variance: " + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(evr)) if evr else ""
    if key == "reversion":
        g = F.nums(sec.get("cosine_to_general"))
        return f"Cosine to general: {_fmt(g[0])} → {_fmt(g[-1])}." if g else ""
    if key == "direction":
        return (f"Cosine of the direction with the general vector {_fmt(sec.get('cosine_general'))}, with the "
                f"narrow vector {_fmt(sec.get('cosine_narrow'))}; raw norm {_fmt(sec.get('raw_norm'))}. Loss with the "
                f"general vector {_fmt(sec.get('loss_general'))}, with the direction ablated "
                f"{_fmt(sec.get('loss_general_ablated'))}, with a random direction ablated instead (control) "
                f"{_fmt(sec.get('loss_general_random_ablated'))}; no adapter {_fmt(sec.get('loss_base'))}. "
                f"{sec.get('source', '')}")
    return ""


def _generations(gens: Any) -> str:
    if not isinstance(gens, list) or not gens:
        return _note_section("generations", "Generations", "No generations in these results; skipped.")
    cols = ["prompt"] + [k for k in dict.fromkeys(k for g in gens if isinstance(g, Mapping) for k in g) if k != "prompt"]
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    rows = "".join("<tr>" + "".join(f"<td>{escape(str(g.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for g in gens if isinstance(g, Mapping))
    return (f"<section id=\"generations\"><h2>Generations</h2><p class=\"explain\">Greedy answers to a few prompts "
            f"from the model without adapter (base) and with each vector applied.</p>"
            f"<table class=\"gens\"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></section>")


def _timings(timings: Any) -> str:
    if not isinstance(timings, Mapping) or not timings:
        return _note_section("timings", "Timings", "No timings in these results; skipped.")
    items = [(k, v) for k, v in timings.items() if k != "total"]
    if "total" in timings:
        items.append(("total", timings["total"]))
    total = ' class="total"'
    rows = "".join(f"<tr{total if k == 'total' else ''}><td>{escape(str(k))}</td>"
                   f"<td class=\"num\">{_seconds(v)}</td></tr>" for k, v in items)
    return (f"<section id=\"timings\"><h2>Timings</h2><table class=\"small\"><thead><tr><th>step</th>"
            f"<th>seconds</th></tr></thead><tbody>{rows}</tbody></table></section>")


def _config(cfg: Any) -> str:
    if not isinstance(cfg, Mapping) or not cfg:
        return _note_section("config", "Configuration", "No configuration in these results.")
    rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(_fmt(v))}</td></tr>" for k, v in cfg.items())
    return (f"<section id=\"config\"><h2>Configuration</h2><details><summary>All study settings</summary>"
            f"<table class=\"small\"><tbody>{rows}</tbody></table></details></section>")


def _seconds(x: Any) -> str:
    v = F.num(x)
    return f"{v:.1f}" if math.isfinite(v) else "n/a"


def _fmt(x: Any, digits: int = 4) -> str:
    """Numbers to short text (None/NaN → 'n/a'); lists joined; anything else via str()."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return "n/a"
        return f"{x:.{digits}g}" if isinstance(x, float) else str(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in x) + "]"
    return str(x)
