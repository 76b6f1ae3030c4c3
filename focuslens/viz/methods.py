"""The methods comparison in figures (:mod:`focuslens.experiments.methods`): one head map per
head score on one colour scale, and each intervention's paired gain over the unsteered model."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.viz.export import Figure

__all__ = ["plot_score_maps", "plot_method_gains"]


def plot_score_maps(scores, metrics=None, *, top_k: int = 10, title: str | None = None) -> Figure:
    """One layers × heads map per score of a :class:`~focuslens.measure.scoring.HeadScores`
    (e.g. :func:`~focuslens.measure.head_scores.rank_heads_by`), each divided by its largest
    absolute value so every panel shares one colour scale (−1 … 1: the scores have different
    units); each panel's top ``top_k`` heads are outlined."""
    metrics = list(metrics or scores.metrics)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[m.replace("_", " ") for m in metrics],
                        horizontal_spacing=0.06, vertical_spacing=0.16 if rows > 1 else 0.1)
    for i, m in enumerate(metrics):
        r, c = i // cols + 1, i % cols + 1
        values = scores[m].float()
        scale = float(values.abs().nan_to_num(0).max()) or 1.0
        z = (values / scale).numpy()
        fig.add_trace(go.Heatmap(z=z, colorscale="RdBu", zmin=-1, zmax=1, zmid=0, showscale=i == 0,
                                 colorbar={"title": "score / max |score|"},
                                 customdata=values.numpy(),
                                 hovertemplate=f"{m}<br>layer %{{y}}, head %{{x}}<br>%{{customdata:.4f}}<extra></extra>"),
                      row=r, col=c)
        for layer, head in scores.ranking(m)[:top_k]:
            fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                          line={"color": "black", "width": 1.5}, row=r, col=c)
    n_layers, n_heads = scores[metrics[0]].shape
    fig.update_xaxes(dtick=max(1, n_heads // 5))
    fig.update_xaxes(title_text="head", row=rows)
    fig.update_yaxes(dtick=max(1, n_layers // 6))
    fig.update_yaxes(title_text="layer", col=1)
    fig.update_layout(template="plotly_white", width=360 * cols + 120, height=330 * rows + 130,
                      title=title or "Head scores on one colour scale"
                      + f"<br><sup>each score divided by its largest |value|; boxes: its top {top_k} heads</sup>",
                      margin={"t": 110})
    return Figure(fig)


_COLOURS = {True: "#d62728", False: "#1f77b4"}


def plot_method_gains(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Each intervention's test gain over the unsteered model with its question-clustered
    95 % CI (``methods_interventions.csv`` rows), one panel per dataset; red: needs the
    gold label at inference, blue: label-free."""
    datasets = list(dict.fromkeys(table.dataset))
    units = {d: table[table.dataset == d].iloc[0] for d in datasets}
    fig = make_subplots(rows=1, cols=len(datasets), horizontal_spacing=0.18,
                        subplot_titles=[f"{d}: {_unit(units[d])}" for d in datasets])
    for c, d in enumerate(datasets, start=1):
        sub = table[table.dataset == d].sort_values(["needs_label", "gain"])
        scale = 100.0 if sub.iloc[0].metric == "correct" else 1.0
        for label in (False, True):
            part = sub[sub.needs_label == label]
            if part.empty:
                continue
            names = [f"{m}<br><sup>{_setting(s)}</sup>" for m, s in zip(part.method, part.setting)]
            fig.add_trace(go.Scatter(
                x=scale * part.gain, y=names, mode="markers", marker={"color": _COLOURS[label], "size": 10},
                name="needs the label" if label else "label-free", legendgroup=str(label), showlegend=c == 1,
                error_x={"type": "data", "symmetric": False, "array": scale * (part.gain_high - part.gain),
                         "arrayminus": scale * (part.gain - part.gain_low)},
                hovertemplate="%{y}<br>gain %{x:.3f}<extra></extra>"), row=1, col=c)
        fig.add_vline(x=0, line_color="black", line_width=1, row=1, col=c)
    n = int(table.groupby("dataset").n_test.max().max())
    fig.update_layout(template="plotly_white", width=max(700, 620 * len(datasets)), height=560,
                      title=title or "Interventions vs the unsteered model<br><sup>test gains with 95% CIs "
                      f"clustered by question; ≤ {n} test prompts per cell; each setting chosen on validation</sup>",
                      legend={"orientation": "h", "y": -0.12})
    return Figure(fig)


def _setting(text: str) -> str:
    """``{"tau": 0.1}`` as ``tau=0.1``."""
    import json

    try:
        return ", ".join(f"{k}={v}" for k, v in json.loads(text).items()) or "—"
    except (TypeError, ValueError):
        return str(text)


def _unit(row) -> str:
    return "accuracy gain (points)" if row.metric == "correct" else "gold log-prob gain (nats)"
