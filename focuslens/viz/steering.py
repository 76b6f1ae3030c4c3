"""Sweep figures: split-softmax (paper Fig. 3) and focus directions (paper Fig. 4)."""

from __future__ import annotations

import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.measure.stats import wilson_interval
from focuslens.viz.export import Figure

__all__ = ["plot_split_softmax_sweep", "plot_focus_sweep", "plot_focus_conditions"]

_REFERENCE_STYLE = {
    "gold_only": ("gold document only", "#2ca02c"),
    "baseline": ("unsteered", "#7f7f7f"),
    "no_gold": ("gold document removed", "#d62728"),
}


def _merged_references(references: dict[str, float] | None, tol: float = 0.005) -> list[tuple[str, float, str]]:
    """``(label, value, colour)`` per reference line, highest first; references whose
    values lie within ``tol`` of each other (they would print the same number and draw
    one line) share one label, e.g. ``"unsteered, gold document removed (0.00)"``, in the
    colour of the first."""
    order = list(references or {})
    groups: list[list[tuple[int, str, float, str]]] = []
    for name, value in sorted((references or {}).items(), key=lambda kv: -kv[1]):
        label, colour = _REFERENCE_STYLE.get(name, (name, "#7f7f7f"))
        if groups and abs(groups[-1][0][2] - value) <= tol:
            groups[-1].append((order.index(name), label, value, colour))
        else:
            groups.append([(order.index(name), label, value, colour)])
    groups = [sorted(g) for g in groups]  # one label names them in the caller's order
    return [(", ".join(e[1] for e in g) + f" ({g[0][2]:.2f})", g[0][2], g[0][3]) for g in groups]


def _reference_lines(fig, references: dict[str, float] | None, y_range=None, **where) -> None:
    """Dotted horizontal lines at the ``references``, labelled in the legend (never over
    the data), highest first, close values merged (:func:`_merged_references`). A value
    outside ``y_range`` gets no line and is marked "above/below the axis" in its label."""
    for i, (label, value, colour) in enumerate(_merged_references(references)):
        line = dict(color=colour, dash="dot", width=1.5)
        if y_range is not None and not y_range[0] <= value <= y_range[1]:
            label += ", above the axis" if value > y_range[1] else ", below the axis"
        else:
            fig.add_hline(y=value, line=line, **where)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line, name=label, legendgroup="references",
                                 legendgrouptitle_text="references" if i == 0 else None, legendrank=2000 + i,
                                 hoverinfo="skip"), **where)


def _draws_phrase(n_draws: int) -> str:
    """How the random heads are summarised: ``"mean ± s.d. over 3 draws"``, ``"1 draw"``
    (no s.d., no error bar) or ``"no draws"``."""
    if n_draws == 1:
        return "1 draw of k heads (no s.d.)"
    return f"mean ± s.d. over {n_draws} draws of k heads" if n_draws > 1 else "no draws"


def _fitted_range(low, high, references: dict[str, float] | None) -> list[float]:
    """A y range around the data's ``low``..``high`` (e.g. the CI bounds) that also takes
    in the references within one data span of it (at least 0.1), padded by 6 %; farther
    references are left off the axis so they cannot squash the data into a strip."""
    lo, hi = float(min(low)), float(max(high))
    reach = max(hi - lo, 0.1)
    near = [v for v in (references or {}).values() if lo - reach <= v <= hi + reach]
    lo, hi = min([lo, *near]), max([hi, *near])
    pad = 0.06 * max(hi - lo, 0.05)
    return [lo - pad, hi + pad]


def plot_split_softmax_sweep(sweep: pd.DataFrame, *, references: dict[str, float] | None = None,
                             title: str | None = None):
    """Accuracy vs the number of boosted heads, one line per τ: the top-k contextual heads
    (solid) against random heads (dashed, mean ± s.d. over draws), from
    :func:`focuslens.steer.split_softmax.split_softmax_sweep` rows. ``references``: horizontal lines,
    e.g. ``{"gold_only": …, "baseline": …, "no_gold": …}``."""

    steered = sweep[sweep.group != "none"]
    taus = sorted(steered.tau.unique(), reverse=True)
    colours = pc.sample_colorscale("Viridis", [0.85 * i / max(1, len(taus) - 1) for i in range(len(taus))])
    fig = go.Figure()
    for tau, colour in zip(taus, colours):
        ctx = steered[(steered.group == "top") & (steered.tau == tau)].groupby("k").correct.mean()
        fig.add_trace(go.Scatter(x=ctx.index, y=ctx.values, mode="lines+markers", name=f"contextual, τ={tau:g}",
                                 line=dict(color=colour, width=2.5), legendgroup=f"{tau}"))
        per_draw = steered[(steered.group == "random") & (steered.tau == tau)].groupby(["k", "draw"]).correct.mean()
        rnd = per_draw.groupby("k").agg(["mean", "std", "count"])
        if len(rnd):  # one draw has no s.d.: no error bar
            bars = dict(type="data", array=rnd["std"].fillna(0), thickness=1) if rnd["count"].max() > 1 else None
            fig.add_trace(go.Scatter(x=rnd.index, y=rnd["mean"], mode="lines+markers", name=f"random, τ={tau:g}",
                                     line=dict(color=colour, dash="dash", width=1.5), marker=dict(symbol="x"),
                                     error_y=bars, legendgroup=f"{tau}"))
    _reference_lines(fig, references)
    n = sweep.example.nunique()
    n_draws = steered[steered.group == "random"].draw.nunique()
    fig.update_layout(
        title=title or "Split-softmax on contextual vs random heads<br>"
        f"<sup>accuracy on {n} held-out prompts; random: {_draws_phrase(n_draws)}; "
        "smaller τ = stronger boost of the gold document</sup>",
        xaxis=dict(title="number of heads steered (k)", type="log", tickvals=sorted(steered.k.unique())),
        yaxis=dict(title="top-1 accuracy (fraction of prompts)", range=[-0.02, 1.05]),
        template="plotly_white", legend=dict(font=dict(size=11)), margin=dict(t=100), width=900, height=560,
    )
    return Figure(fig)


def _accuracy_ci(rows: pd.DataFrame) -> pd.DataFrame:
    """Per α: ``acc`` (mean of ``correct``), ``n`` prompts and the Wilson 95 % interval
    ``lo``..``hi`` (:func:`~focuslens.measure.stats.wilson_interval`)."""
    g = rows.groupby("alpha").correct.agg(acc="mean", n="count")
    ci = [wilson_interval(a, n) for a, n in zip(g.acc, g.n)]
    return g.assign(lo=[c[0] for c in ci], hi=[c[1] for c in ci])


def plot_focus_sweep(sweep: pd.DataFrame, *, references: dict[str, float] | None = None,
                     title: str | None = None, chosen: dict | None = None):
    """Two panels from :func:`focuslens.steer.focus.focus_sweep` rows: accuracy vs α (bars:
    Wilson 95 % CIs over the prompts; y axis fitted to the data, :func:`_fitted_range`)
    and the steered heads' attention mass on the gold document vs α, one line per k.
    ``chosen`` (``{"k": …, "alpha": …}``) is circled; ``references`` are dotted lines
    labelled in the legend."""

    ks = sorted(sweep.k.unique())
    colours = pc.sample_colorscale("Plasma", [0.85 * i / max(1, len(ks) - 1) for i in range(len(ks))])
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "accuracy (bars: Wilson 95% CI)", "attention mass on the gold document (steered heads)"))
    # "all heads" only where the sweep says so (k = None steers every head: group "all")
    every = set(sweep[sweep.group == "all"].k) if "group" in sweep else set()
    cis = []
    for k, colour in zip(ks, colours):
        acc, mass = _accuracy_ci(sweep[sweep.k == k]), sweep[sweep.k == k].groupby("alpha").gold_mass.mean()
        cis.append(acc)
        name = f"k = {k}" + (" (all heads)" if k in every else "")
        fig.add_trace(go.Scatter(x=acc.index, y=acc.acc, mode="lines+markers", name=name, line=dict(color=colour),
                                 legendgroup=name, customdata=acc[["lo", "hi", "n"]].to_numpy(),
                                 error_y=dict(type="data", symmetric=False, array=acc.hi - acc.acc,
                                              arrayminus=acc.acc - acc.lo, thickness=1, width=3,
                                              color=colour.replace("rgb(", "rgba(").replace(")", ", 0.5)")),
                                 hovertemplate="α %{x}<br>accuracy %{y:.3f} [%{customdata[0]:.3f}, "
                                 "%{customdata[1]:.3f}] over %{customdata[2]} prompts"), row=1, col=1)
        fig.add_trace(go.Scatter(x=mass.index, y=mass.values, mode="lines+markers", name=name, showlegend=False,
                                 line=dict(color=colour), legendgroup=name), row=1, col=2)
    if chosen:
        acc = sweep[(sweep.k == chosen["k"]) & (sweep.alpha == chosen["alpha"])].correct.mean()
        fig.add_trace(go.Scatter(x=[chosen["alpha"]], y=[acc], mode="markers", name="chosen on validation",
                                 marker=dict(size=16, symbol="circle-open", color="black", line=dict(width=2))),
                      row=1, col=1)
    y_range = _fitted_range(pd.concat(cis).lo, pd.concat(cis).hi, references)
    _reference_lines(fig, references, y_range, row=1, col=1)
    fig.update_xaxes(title_text="α (steering strength; α < 0 reverses the direction)")
    fig.update_yaxes(title_text="top-1 accuracy (fraction of prompts)", range=y_range, row=1, col=1)
    fig.update_yaxes(title_text="mean attention mass from the answer rows", row=1, col=2)
    fig.update_layout(
        title=title or f"Focus directions on the top-k contextual heads<br><sup>{sweep.example.nunique()} prompts; "
        "α·d_q added to the queries at the answer rows, no label of the relevant document</sup>",
        template="plotly_white", margin=dict(t=130, b=150), width=1100, height=620,
        legend=dict(orientation="h", x=0, y=-0.2, yanchor="top", font=dict(size=11)),
    )
    return Figure(fig)


_PARTS = {"gold_title": "gold: title tokens", "gold_answer": "gold: answer token", "irrelevant": "irrelevant documents",
          "sink": "attention sink"}


def plot_focus_conditions(cells: pd.DataFrame, mechanism: pd.DataFrame | None = None, *, title: str | None = None):
    """Left: test-accuracy gain of focus directions over the unsteered model (points, with
    paired-bootstrap 95 % CIs) per task × layout × head ranking × rows, (k, α) chosen on
    validation; the negative-α control as crosses. Right: where the steered heads'
    attention from the answer rows lands, unsteered vs steered, per task × layout
    (:func:`focuslens.experiments.conditions.gold_breakdown`)."""

    cells = cells.reset_index(drop=True)
    labels = [f"{c.task.replace('synthetic_', '')} · {c.layout} · {c.ranking} · {c.rows}" for c in cells.itertuples()]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.28,
                        subplot_titles=("gain in test accuracy (points), 95% CI", "attention of the steered heads"))
    gain = 100 * cells.gain
    lo, hi = 100 * cells.gain_ci.str[0], 100 * cells.gain_ci.str[1]
    neg = 100 * (cells.negative_alpha_test_acc - cells.baseline)
    fig.add_trace(go.Scatter(x=gain, y=labels, mode="markers", name="chosen (k, α) − unsteered",
                             marker=dict(size=9, color="#1f77b4"),
                             error_x=dict(type="data", symmetric=False, array=hi - gain, arrayminus=gain - lo)), 1, 1)
    fig.add_trace(go.Scatter(x=neg, y=labels, mode="markers", name="same k at −α − unsteered",
                             marker=dict(size=8, symbol="x", color="#d62728")), 1, 1)
    fig.add_vline(x=0, line=dict(color="#7f7f7f", width=1), row=1, col=1)
    fig.add_vline(x=10, line=dict(color="#2ca02c", dash="dot", width=1), row=1, col=1, annotation_text="goal +10",
                  annotation_font=dict(size=11, color="#2ca02c"))
    if mechanism is not None and len(mechanism):
        colours = {"gold_title": "#2ca02c", "gold_answer": "#98df8a", "irrelevant": "#ff7f0e", "sink": "#7f7f7f"}
        m = mechanism.assign(where=lambda d: d.task.str.replace("synthetic_", "") + " · " + d.layout + " · " +
                             d.alpha.map(lambda a: "unsteered" if a == 0 else f"α={a:g}"))
        for part, colour in colours.items():
            sub = m[m.part == part]
            fig.add_trace(go.Bar(x=sub.mass, y=sub["where"], orientation="h", name=_PARTS[part],
                                 marker_color=colour), 1, 2)
        fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="points", row=1, col=1)
    fig.update_xaxes(title_text="mean attention mass from the answer rows", row=1, col=2)
    fig.update_layout(title=title or "Focus directions across conditions (SmolLM2; held-out test prompts)",
                      height=max(420, 34 * len(cells) + 180), width=1400, template="plotly_white",
                      legend=dict(orientation="h", y=-0.12))
    return Figure(fig)
