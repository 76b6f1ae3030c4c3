"""Sweep figures: split-softmax (paper Fig. 3) and focus directions (paper Fig. 4)."""

from __future__ import annotations

import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.viz.export import Figure

__all__ = ["plot_split_softmax_sweep", "plot_focus_sweep", "plot_focus_conditions"]

_REFERENCE_STYLE = {
    "gold_only": ("gold document only", "#2ca02c"),
    "baseline": ("unsteered", "#7f7f7f"),
    "no_gold": ("gold document removed", "#d62728"),
}


def _reference_lines(fig, references: dict[str, float] | None, **where) -> None:
    for name, value in (references or {}).items():
        label, colour = _REFERENCE_STYLE.get(name, (name, "#7f7f7f"))
        fig.add_hline(y=value, line=dict(color=colour, dash="dot", width=1.5), annotation_text=f"{label} ({value:.2f})",
                      annotation_position="top left", annotation_font=dict(size=11, color=colour), **where)


def plot_split_softmax_sweep(sweep: pd.DataFrame, *, references: dict[str, float] | None = None,
                             title: str | None = None):
    """Accuracy vs the number of boosted heads, one line per τ: the top-k contextual heads
    (solid) against random heads (dashed, mean ± s.d. over draws), from
    :func:`focuslens.steering.split_softmax_sweep` rows. ``references``: horizontal lines,
    e.g. ``{"gold_only": …, "baseline": …, "no_gold": …}``."""

    steered = sweep[sweep.group != "none"]
    taus = sorted(steered.tau.unique(), reverse=True)
    colours = pc.sample_colorscale("Viridis", [0.85 * i / max(1, len(taus) - 1) for i in range(len(taus))])
    fig = go.Figure()
    for tau, colour in zip(taus, colours):
        ctx = steered[(steered.group == "contextual") & (steered.tau == tau)].groupby("k").correct.mean()
        fig.add_trace(go.Scatter(x=ctx.index, y=ctx.values, mode="lines+markers", name=f"contextual, τ={tau:g}",
                                 line=dict(color=colour, width=2.5), legendgroup=f"{tau}"))
        per_draw = steered[(steered.group == "random") & (steered.tau == tau)].groupby(["k", "draw"]).correct.mean()
        rnd = per_draw.groupby("k").agg(["mean", "std"]).fillna(0)
        if len(rnd):
            fig.add_trace(go.Scatter(x=rnd.index, y=rnd["mean"], mode="lines+markers", name=f"random, τ={tau:g}",
                                     line=dict(color=colour, dash="dash", width=1.5), marker=dict(symbol="x"),
                                     error_y=dict(type="data", array=rnd["std"], thickness=1), legendgroup=f"{tau}"))
    _reference_lines(fig, references)
    n = sweep.example.nunique()
    n_draws = steered[steered.group == "random"].draw.nunique()
    fig.update_layout(
        title=title or "Split-softmax on contextual vs random heads<br>"
        f"<sup>accuracy on {n} held-out prompts; random: mean ± s.d. over {n_draws} draws of k heads; "
        "smaller τ = stronger boost of the gold document</sup>",
        xaxis=dict(title="number of heads steered (k)", type="log", tickvals=sorted(steered.k.unique())),
        yaxis=dict(title="top-1 accuracy (fraction of prompts)", range=[-0.02, 1.05]),
        template="plotly_white", legend=dict(font=dict(size=11)), margin=dict(t=100), width=900, height=560,
    )
    return Figure(fig)


def plot_focus_sweep(sweep: pd.DataFrame, *, references: dict[str, float] | None = None,
                     title: str | None = None, chosen: dict | None = None):
    """Two panels from :func:`focuslens.focusing.focus_sweep` rows: accuracy vs α and
    the steered heads' attention mass on the gold document vs α, one line per k.
    ``chosen`` (``{"k": …, "alpha": …}``) is circled."""

    ks = sorted(sweep.k.unique())
    colours = pc.sample_colorscale("Plasma", [0.85 * i / max(1, len(ks) - 1) for i in range(len(ks))])
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "accuracy", "attention mass on the gold document (steered heads)"))
    n_all = max(ks)
    for k, colour in zip(ks, colours):
        g = sweep[sweep.k == k].groupby("alpha")[["correct", "gold_mass"]].mean()
        name = f"k = {k}" + (" (all heads)" if k == n_all and len(ks) > 1 else "")
        fig.add_trace(go.Scatter(x=g.index, y=g.correct, mode="lines+markers", name=name,
                                 line=dict(color=colour), legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=g.index, y=g.gold_mass, mode="lines+markers", name=name, showlegend=False,
                                 line=dict(color=colour), legendgroup=name), row=1, col=2)
    if chosen:
        acc = sweep[(sweep.k == chosen["k"]) & (sweep.alpha == chosen["alpha"])].correct.mean()
        fig.add_trace(go.Scatter(x=[chosen["alpha"]], y=[acc], mode="markers", name="chosen on validation",
                                 marker=dict(size=16, symbol="circle-open", color="black", line=dict(width=2))),
                      row=1, col=1)
    _reference_lines(fig, references, row=1, col=1)
    n = sweep.example.nunique()
    fig.update_xaxes(title_text="α (steering strength; α < 0 reverses the direction)")
    fig.update_yaxes(title_text="top-1 accuracy (fraction of prompts)", range=[-0.02, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="mean attention mass from the answer rows", row=1, col=2)
    fig.update_layout(
        title=title or f"Focus directions on the top-k contextual heads<br><sup>{n} prompts; α·d_q added to the "
        "queries at the answer rows, no label of the relevant document</sup>",
        template="plotly_white", margin=dict(t=110), width=1100, height=520,
    )
    return Figure(fig)


_PARTS = {"gold_title": "gold: title tokens", "gold_answer": "gold: answer token", "irrelevant": "irrelevant documents",
          "sink": "attention sink"}


def plot_focus_conditions(cells: pd.DataFrame, mechanism: pd.DataFrame | None = None, *, title: str | None = None):
    """Left: test-accuracy gain of focus directions over the unsteered model (points, with
    paired-bootstrap 95 % CIs) per task × layout × head ranking × rows, (k, α) chosen on
    validation; the negative-α control as crosses. Right: where the steered heads'
    attention from the answer rows lands, unsteered vs steered, per task × layout
    (:func:`focuslens.experiments.gold_breakdown`)."""

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
