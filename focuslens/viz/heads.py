"""Head-location maps (layers × heads, paper Fig. 2 style), the rank-agreement scatter, and
the top-k overlap of several rankings of one model's heads."""

from __future__ import annotations

from collections.abc import Mapping

import plotly.graph_objects as go
import torch

from focuslens.viz.compare import topk_overlap
from focuslens.viz.export import Figure, wrap_label

__all__ = ["plot_head_map", "plot_rank_agreement", "plot_topk_overlap"]


def plot_head_map(scores, metric: str = "gold", *, title: str | None = None, top_k: int = 10):
    """Heatmap of a :class:`~focuslens.scoring.HeadScores` metric; the top-k heads boxed.

    Layers run bottom (0) to top, heads left to right; colour is the mean attention mass.
    """

    values = scores[metric].float()
    n_layers, n_heads = values.shape
    fig = go.Figure(
        go.Heatmap(
            z=values.numpy(),
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            colorscale="Viridis",
            colorbar=dict(title=dict(text="attention mass<br>on span", side="right")),
            hovertemplate="layer %{y}, head %{x}<br>score %{z:.3f}<extra></extra>",
        )
    )
    for rank, (layer, head) in enumerate(scores.top_k(top_k, metric)):
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color="red", width=2))
        fig.add_annotation(x=head, y=layer, text=str(rank + 1), showarrow=False,
                           font=dict(color="white", size=11))
    meta = scores.metadata
    label = {"gold": "gold (relevant) document"}.get(metric, metric.replace("_", " "))
    fig.update_layout(
        title=title or f"Contextual heads of {meta.get('model', 'the model')}<br>"
        f"<sup>colour: attention mass from the answer rows to the {label}, mean over "
        f"{meta.get('n_examples', '?')} prompts<br>setting: {meta.get('setting', '')}, answer rows: "
        f"{meta.get('answer_rows', '')}; red boxes: top {top_k}, numbered by rank</sup>",
        margin=dict(t=130),
        xaxis=dict(title="head", dtick=1),
        yaxis=dict(title="layer", dtick=max(1, n_layers // 15)),
        template="plotly_white",
        width=520 + 25 * n_heads,
        height=300 + 18 * n_layers,
    )
    return Figure(fig)


def plot_rank_agreement(x, y, *, x_label: str, y_label: str, title: str, highlight=()):
    """Scatter of two per-head quantities ([layer, head] tensors), one point per head."""

    n_heads = x.shape[1]
    mask = ~(torch.isnan(x) | torch.isnan(y))
    idx = mask.flatten().nonzero().flatten()
    xs, ys = x.flatten()[idx], y.flatten()[idx]
    labels = [f"L{int(i) // n_heads}H{int(i) % n_heads}" for i in idx]
    hl = {f"L{l}H{h}" for l, h in highlight}
    fig = go.Figure(
        go.Scatter(
            x=xs.numpy(),
            y=ys.numpy(),
            mode="markers",
            hovertext=labels,
            marker=dict(color=["crimson" if lab in hl else "steelblue" for lab in labels], size=8, opacity=0.8),
        )
    )
    # label highlighted heads with arrows whose lengths alternate in x order, so that
    # neighbouring (or coinciding) points get labels at different heights
    marked = sorted((float(xv), float(yv), lab) for xv, yv, lab in zip(xs, ys, labels) if lab in hl)
    for i, (xv, yv, lab) in enumerate(marked):
        fig.add_annotation(x=xv, y=yv, text=lab, showarrow=True, arrowhead=0, arrowcolor="crimson",
                           ax=0, ay=(-25, 25, -50, 50)[i % 4], font=dict(size=11, color="crimson"))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white",
                      width=800, height=600)
    return Figure(fig)


def plot_topk_overlap(
    results: Mapping, k: int = 20, *, metric: str | None = None, title: str | None = None
) -> Figure:
    """Top-k overlap between the contextual-head sets of several scoring settings of one
    model (e.g. answer rows from the prefix vs the greedy answer): cell = ``|A ∩ B| / k``,
    annotated with the count of shared heads."""

    table = topk_overlap(results, k, metric=metric)
    names = list(table.columns)
    z = table.to_numpy()
    text = [[f"{v:.2f}<br>({round(v * k)}/{k})" for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[wrap_label(s, 18) for s in names],
            y=[wrap_label(s, 18) for s in names],
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=text,
            texttemplate="%{text}",
            textfont=dict(size=12),
            colorbar=dict(title=dict(text=f"shared fraction<br>of the top {k}", side="right")),
            hovertemplate="%{y} vs %{x}<br>%{text}<extra></extra>",
        )
    )
    # dark cells get white text: plotly picks a contrasting colour automatically in ≥ 5.x
    fig.update_layout(
        title=title
        or f"Overlap of the top-{k} contextual heads between settings"
        f"<br><sup>cell: |A ∩ B| / {k} (shared heads / {k})</sup>",
        xaxis=dict(title="setting", tickangle=0),
        yaxis=dict(title="setting", autorange="reversed", scaleanchor="x"),
        template="plotly_white",
        margin=dict(t=100),
        width=260 + 130 * len(names),
        height=220 + 120 * len(names),
    )
    return Figure(fig)
