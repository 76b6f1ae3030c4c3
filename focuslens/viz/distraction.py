"""The distraction figure: accuracy vs number of documents, and by gold position."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.viz.export import Figure

__all__ = ["plot_distraction"]


def _binomial_se(p: float, n: int) -> float:
    return (p * (1 - p) / max(n, 1)) ** 0.5


def plot_distraction(results: pd.DataFrame, *, title: str | None = None):
    """Two panels from :func:`focuslens.measure.distraction.distraction` rows.

    Left: accuracy (± 1 binomial s.e.) vs the number of documents, gold at random
    positions. Right: accuracy with the largest number of documents by gold position.
    """
    rand = results[results.setting == "random"]
    n_max = int(results.n_documents.max())
    pos = results[(results.setting != "random") & (results.n_documents == n_max)]
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.6, 0.4],
        subplot_titles=(
            "Gold document at a random position",
            f"{n_max} documents, by gold position",
        ),
    )
    _add_accuracy_curves(fig, rand)
    _add_position_bars(fig, pos, n_max)
    _style_distraction(fig, rand, title)
    return Figure(fig)


def _add_accuracy_curves(fig, rand: pd.DataFrame) -> None:
    """Left panel: top-1 (solid) and candidate (dotted) accuracy per number of documents,
    with ± 1 binomial s.e. error bars."""
    for metric, name, dash in (("correct", "top-1 accuracy", "solid"), ("candidate_correct", "candidate accuracy", "dot")):
        g = rand.groupby("n_documents")[metric].agg(["mean", "count"]).reset_index()
        fig.add_trace(
            go.Scatter(
                x=g.n_documents,
                y=g["mean"],
                mode="lines+markers",
                name=name,
                line=dict(dash=dash),
                error_y=dict(type="data", array=[_binomial_se(m, n) for m, n in zip(g["mean"], g["count"])]),
            ),
            row=1,
            col=1,
        )


def _add_position_bars(fig, pos: pd.DataFrame, n_max: int) -> None:
    """Right panel: top-1 accuracy with ``n_max`` documents for each gold position present
    (first, middle, last), with error bars and the value written above each."""
    order = [p for p in ("first", "middle", "last") if p in set(pos.setting)]
    g = pos.groupby("setting")["correct"].agg(["mean", "count"]).reindex(order)
    se = [_binomial_se(m, n) for m, n in zip(g["mean"], g["count"])]
    fig.add_trace(
        go.Bar(
            x=order,
            y=g["mean"],
            name=f"top-1 accuracy ({n_max} docs)",
            error_y=dict(type="data", array=se),
            marker_color="#7f7f7f",
        ),
        row=1,
        col=2,
    )
    for x, m, e in zip(order, g["mean"], se):  # value labels above the error bars, not on them
        fig.add_annotation(x=x, y=m + e, text=f"{m:.2f}", showarrow=False, yshift=12, row=1, col=2)


def _style_distraction(fig, rand: pd.DataFrame, title: str | None) -> None:
    """Axes (a log document axis ticked at the counts run), legend, and a title giving the
    number of prompts per point (the fewest over the document counts)."""
    n = int(rand.groupby("n_documents").size().min())
    fig.update_xaxes(title_text="number of documents (1 relevant + distractors)", type="log",
                     tickvals=sorted(rand.n_documents.unique()), row=1, col=1)
    fig.update_xaxes(title_text="position of the gold document", row=1, col=2)
    fig.update_yaxes(title_text="accuracy (fraction of prompts)", range=[0, 1.08], row=1, col=1)
    fig.update_yaxes(range=[0, 1.08], row=1, col=2)
    fig.update_layout(
        title=title or f"Distraction: accuracy falls as irrelevant documents are added (n = {n} prompts per point)",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.2),
        margin=dict(t=90),
    )
