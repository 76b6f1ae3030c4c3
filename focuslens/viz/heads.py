"""Head-location maps (layers × heads, paper Fig. 2 style), the rank-agreement scatter, and
the top-k overlap of several rankings of one model's heads."""

from __future__ import annotations

from collections.abc import Mapping

import plotly.graph_objects as go
import torch

from focuslens.errors import DataError
from focuslens.viz.compare import topk_depth_overlap, topk_overlap
from focuslens.viz.export import Figure, wrap_label

__all__ = ["plot_head_map", "plot_rank_agreement", "plot_topk_overlap"]


def _at_chance_marks(values, chance: float) -> go.Scatter:
    """A white × on every head whose value is at or below ``chance`` (none if it is NaN)."""
    layers, heads = torch.nonzero(values <= chance, as_tuple=True)
    return go.Scatter(x=heads.tolist(), y=layers.tolist(), mode="markers", name="at or below chance",
                      marker=dict(symbol="x-thin", size=7, line=dict(color="white", width=1.5)),
                      showlegend=False, hovertemplate=f"layer %{{y}}, head %{{x}}<br>≤ chance {chance:.3f}"
                                                      "<extra></extra>")


def plot_head_map(scores, metric: str = "gold", *, title: str | None = None, top_k: int = 10):
    """Heatmap of a :class:`~focuslens.measure.scoring.HeadScores` metric; the top-k heads boxed.

    Layers run bottom (0) to top, heads left to right; colour is the mean attention mass.
    When the metric's chance level is known (``scores.chance_level(metric)``: uniform
    attention over the visible keys) it is written on the colour bar and in the subtitle,
    and every head at or below it gets a white ×: such a head is no evidence of focus.
    """

    values = scores[metric].float()
    n_layers, n_heads = values.shape
    chance = scores.chance_level(metric)
    known = bool(torch.isfinite(torch.tensor(chance)))  # NaN: no chance level is known
    fig = go.Figure(
        go.Heatmap(
            z=values.numpy(),
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            colorscale="Viridis",
            colorbar=dict(title=dict(text="attention mass<br>on span" + (f"<br>(chance {chance:.3f})" if known
                                                                          else ""), side="right")),
            hovertemplate="layer %{y}, head %{x}<br>score %{z:.3f}<extra></extra>",
        )
    )
    if known:
        fig.add_trace(_at_chance_marks(values, chance))
    for rank, (layer, head) in enumerate(scores.ranking(metric)[:top_k]):
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
        f"{meta.get('answer_rows', '')}; red boxes: top {top_k}, numbered by rank"
        + (f"<br>chance {chance:.3f} (uniform attention over the visible keys); ×: at or below chance"
           if known else "") + "</sup>",
        margin=dict(t=150 if known else 130),
        xaxis=dict(title="head", dtick=1),
        yaxis=dict(title="layer", dtick=max(1, n_layers // 15)),
        template="plotly_white",
        width=520 + 25 * n_heads,
        height=300 + 18 * n_layers,
    )
    return Figure(fig)


def plot_rank_agreement(x, y, *, x_label: str, y_label: str, title: str, highlight=(), label_top: int = 5):
    """Scatter of two per-head quantities ([layer, head] tensors), one point per head.
    The ``highlight`` heads are red and labelled ``L{layer}H{head}`` in red; the
    ``label_top`` heads with the largest ``y`` (e.g. the strongest causal heads) are
    labelled too (dark grey unless highlighted), so the outliers of either axis are
    named; labels are placed apart from each other (:func:`_place_labels`)."""

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
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white",
                      width=800, height=600)
    top = [int(i) for i in torch.argsort(ys, descending=True)[:max(label_top, 0)]]
    marked = top + sorted((i for i, lab in enumerate(labels) if lab in hl and i not in top), key=lambda i: -ys[i])
    _place_labels(fig, xs, ys, labels, marked, hl)
    return Figure(fig)


#: Where a label may go, relative to its point (px; y down): beside, then above/below.
_OFFSETS = ((28, -8), (28, 10), (-28, -8), (-28, 10), (0, -24), (0, 24), (28, -30), (-28, -30), (28, 30),
            (-28, 30), (0, -48), (0, 48))


def _place_labels(fig, xs, ys, labels: list[str], marked: list[int], highlight) -> None:
    """``L{layer}H{head}`` beside each ``marked`` point (red for ``highlight``, else dark
    grey), in order, each at the first of :data:`_OFFSETS` whose box, estimated in pixels,
    clears the labels placed so far and every marked point; points in the right sixth
    try the left side first."""
    if not marked:
        return
    plot_w, plot_h = (fig.layout.width or 800) - 160, (fig.layout.height or 600) - 180  # default margins
    to_px = _pixel_map(xs, ys, plot_w, plot_h)
    boxes = [(px - 6, py - 6, px + 6, py + 6) for px, py in (to_px(xs[i], ys[i]) for i in marked)]
    for i in marked:
        (px, py), w = to_px(xs[i], ys[i]), 7 * len(labels[i]) + 4
        offsets = sorted(_OFFSETS, key=lambda o: o[0] > 0) if px > 5 / 6 * plot_w else _OFFSETS
        for ax, ay in offsets:
            x0 = px + ax if ax > 0 else px + ax - w if ax < 0 else px - w / 2
            box = (x0, py + ay - 8, x0 + w, py + ay + 8)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        colour = "crimson" if labels[i] in highlight else "#333"
        fig.add_annotation(x=float(xs[i]), y=float(ys[i]), text=labels[i], showarrow=True, arrowhead=0,
                           arrowcolor=colour, arrowwidth=1, ax=ax, ay=ay, standoff=4,
                           xanchor="left" if ax > 0 else "right" if ax < 0 else "center",
                           font=dict(size=11, color=colour))


def _pixel_map(xs, ys, width: float, height: float):
    """Data → approximate pixel position (y down) in a plot area ``width`` × ``height``
    that spans the data with 5 % padding, as plotly's autorange does."""
    x_lo, x_hi, y_lo, y_hi = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    x_pad, y_pad = 0.05 * (x_hi - x_lo or 1), 0.05 * (y_hi - y_lo or 1)
    return lambda x, y: ((float(x) - x_lo + x_pad) / (x_hi - x_lo + 2 * x_pad) * width,
                         (y_hi + y_pad - float(y)) / (y_hi - y_lo + 2 * y_pad) * height)


def plot_topk_overlap(
    results: Mapping, k: int = 20, *, metric: str | None = None, by: str = "heads", bins: int = 10,
    title: str | None = None,
) -> Figure:
    """Top-k overlap between head rankings. ``by="heads"``: the contextual-head sets of
    several scoring settings of one model (e.g. answer rows from the prefix vs the greedy
    answer), cell = ``|A ∩ B| / k``, annotated with the count of shared heads
    (:func:`~focuslens.viz.compare.topk_overlap`). ``by="depth"``: models of any shapes,
    cell = the overlap of their top-k heads' relative-depth profiles over ``bins`` bins
    (:func:`~focuslens.viz.compare.topk_depth_overlap`)."""

    if by not in ("heads", "depth"):
        raise DataError(f"by={by!r}: 'heads' (one model's settings) or 'depth' (models of any shapes).")
    if by == "heads":
        table = topk_overlap(results, k, metric=metric)
        text = [[f"{v:.2f}<br>({round(v * k)}/{k})" for v in row] for row in table.to_numpy()]
        axis, bar = "setting", f"shared fraction<br>of the top {k}"
        default = (f"Overlap of the top-{k} contextual heads between settings"
                   f"<br><sup>cell: |A ∩ B| / {k} (shared heads / {k})</sup>")
    else:
        table = topk_depth_overlap(results, k, bins=bins, metric=metric)
        text = [[f"{v:.2f}" for v in row] for row in table.to_numpy()]
        axis, bar = "model", "depth-profile<br>overlap"
        default = (f"Top-{k} contextual heads: at the same relative depths?"
                   f"<br><sup>cell: Σ over {bins} depth bins of min(share of A's top {k}, share of B's)"
                   "<br>1: the same depth profile, 0: no depth in common</sup>")
    names = list(table.columns)
    z = table.to_numpy()
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
            colorbar=dict(title=dict(text=bar, side="right")),
            hovertemplate="%{y} vs %{x}<br>%{text}<extra></extra>",
        )
    )
    # dark cells get white text: plotly picks a contrasting colour automatically in ≥ 5.x
    fig.update_layout(
        title=title or default,
        xaxis=dict(title=axis, tickangle=0),
        yaxis=dict(title=axis, autorange="reversed", scaleanchor="x"),
        template="plotly_white",
        margin=dict(t=120),
        width=max(260 + 130 * len(names), 640),
        height=220 + 120 * len(names),
    )
    return Figure(fig)
