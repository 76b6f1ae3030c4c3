"""The panels of :func:`focuslens.viz.cross_model.plot_head_locations`: one heatmap per
model over heads × relative depth with its top-k heads boxed, then a strip that puts every
model's top-k heads on one depth axis, and the axes, colour axes and size that make the
columns line up."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.viz.compare import RANK_LABEL, relative_depth
from focuslens.viz.export import wrap_label


def _is_rank(label: str) -> bool:
    return label == RANK_LABEL


def _nice_dtick(n: int, max_ticks: int = 10) -> int:
    """The smallest of 1, 2, 4, 5, 10, 20, ... that keeps ≤ max_ticks ticks on n cells."""
    for step in (1, 2, 4, 5, 10, 20, 25, 50, 100):
        if math.ceil(n / step) <= max_ticks:
            return step
    return math.ceil(n / max_ticks)


def _location_widths(maps) -> tuple[list[float], float]:
    """The column widths (fractions summing to 1) of the heatmaps and the shared-depth
    strip, and the plot-area width in px they get (260 px per unit of width). A heatmap
    is wide enough for 9 and for 28 heads; the strip widens with the number of models."""
    heat_w = [max(0.6, min(1.3, m.n_heads / 18)) for m in maps]
    strip_w = max(1.0, 0.55 * len(maps))
    widths = [w / (sum(heat_w) + strip_w) for w in [*heat_w, strip_w]]
    return widths, 260 * sum(heat_w) + 260 * strip_w


def _location_subplots(maps, widths: list[float], top_k: int):
    """One row: a column per model (titled with its name and shape), then the strip."""
    panel_titles = [f"<b>{wrap_label(m.name, 24)}</b><br>{m.n_layers} layers × {m.n_heads} heads" for m in maps]
    return make_subplots(
        rows=1,
        cols=len(maps) + 1,
        shared_yaxes=True,
        column_widths=widths,
        horizontal_spacing=0.035,
        subplot_titles=[*panel_titles, f"<b>top {top_k} heads, all models</b><br>same depth axis"],
    )


def _add_heat_panel(fig, m, sub, col: int, *, shared_scale: bool, cell_px: float) -> None:
    """Column ``col``: model ``m``'s heatmap, its top-k heads ``sub`` boxed in red and,
    where a cell is at least 15 px wide, numbered by rank; its head axis."""
    fig.add_trace(_heatmap(fig, m, col, shared_scale), row=1, col=col)
    half = 0.5 * (relative_depth(1, m.n_layers) if m.n_layers > 1 else 1.0)  # half a layer
    for row in sub.itertuples():
        fig.add_shape(
            type="rect",
            x0=row.head - 0.5,
            x1=row.head + 0.5,
            y0=row.relative_depth - half,
            y1=row.relative_depth + half,
            line=dict(color="red", width=1.5),
            row=1,
            col=col,
        )
    if cell_px >= 15:
        fig.add_trace(
            go.Scatter(
                x=sub["head"],
                y=sub["relative_depth"],
                mode="text",
                text=sub["rank"].astype(str),
                textfont=dict(color="black", size=9),
                hoverinfo="skip",
                showlegend=False,
            ),
            row=1,
            col=col,
        )
    fig.update_xaxes(
        title_text="head",
        dtick=_nice_dtick(m.n_heads),
        range=[-0.5, m.n_heads - 0.5],
        showgrid=False,
        zeroline=False,
        row=1,
        col=col,
    )


def _heatmap(fig, m, col: int, shared_scale: bool):
    """Model ``m``'s values per (layer, head), rows at their relative depth; the hover
    gives layer, head, score and rank (0 = unranked). On the figure's shared colour axis
    when every model has the same label, else with its own colour bar under column ``col``."""
    rank_of = {h: r + 1 for r, h in enumerate(m.ranking)}
    custom = np.array(
        [[[layer, rank_of.get((layer, head), 0)] for head in range(m.n_heads)] for layer in range(m.n_layers)]
    )
    heat = dict(
        z=m.values.numpy(),
        x=np.arange(m.n_heads),
        y=relative_depth(np.arange(m.n_layers), m.n_layers),
        customdata=custom,
        name=m.name,
        hovertemplate=f"<b>{m.name}</b><br>layer %{{customdata[0]}} of {m.n_layers}, head %{{x}}"
        "<br>relative depth %{y:.2f}<br>score %{z:.3g}<br>rank %{customdata[1]} (0 = unranked)"
        "<extra></extra>",
    )
    if shared_scale:
        return go.Heatmap(**heat, coloraxis="coloraxis")
    bounds = dict(zmin=0, zmax=1) if _is_rank(m.label) else {}  # the best head: the top colour
    return go.Heatmap(**heat, **bounds, colorscale="Viridis", colorbar=_column_colorbar(fig, col, m.label))


def _column_colorbar(fig, col: int, label: str) -> dict:
    """A horizontal colour bar under column ``col``, as wide as its x axis."""
    domain = fig.layout[f"xaxis{col if col > 1 else ''}"].domain
    return dict(
        title=dict(text=label, side="top"),
        orientation="h",
        thickness=10,
        x=(domain[0] + domain[1]) / 2,
        xanchor="center",
        len=domain[1] - domain[0],
        y=-0.1,
        yanchor="top",
        tickfont=dict(size=10),
    )


def _add_depth_strip(fig, maps, top, top_k: int) -> None:
    """The last column: one sub-column per model holding its top-k heads at their depth,
    separated by grey lines and labelled with the model names."""
    n = len(maps)
    for i, m in enumerate(maps):
        fig.add_trace(_strip_trace(m, top, i, top_k), row=1, col=n + 1)
    fig.update_xaxes(
        tickvals=list(range(n)),
        ticktext=[wrap_label(m.name) for m in maps],
        range=[-0.6, n - 0.4],
        showgrid=False,
        zeroline=False,
        tickfont=dict(size=10),
        row=1,
        col=n + 1,
    )
    for i in range(1, n):
        fig.add_vline(x=i - 0.5, line=dict(color="lightgrey", width=1), row=1, col=n + 1)


def _strip_trace(m, top, i: int, top_k: int):
    """Model ``m``'s top-k heads as markers around x = ``i``: heads of one layer spread
    sideways (at most ±0.42), colour and size by rank (rank 1 largest)."""
    sub = top[top.model == m.name].copy()
    within = sub.groupby("layer").cumcount().to_numpy()
    count = sub.groupby("layer")["layer"].transform("size").to_numpy()
    sub["x"] = i + np.clip((within - (count - 1) / 2) * 0.09, -0.42, 0.42)
    return go.Scatter(
        x=sub["x"],
        y=sub["relative_depth"],
        mode="markers",
        name=m.name,
        showlegend=False,
        customdata=np.stack([sub["layer"], sub["head"], sub["rank"], sub["score"]], axis=-1),
        marker=dict(
            color=sub["rank"],
            coloraxis="coloraxis2",
            size=np.interp(sub["rank"], [1, top_k], [13, 6]),
            line=dict(color="black", width=0.5),
        ),
        hovertemplate=f"<b>{m.name}</b><br>L%{{customdata[0]}}H%{{customdata[1]}}, "
        "rank %{customdata[2]}<br>relative depth %{y:.2f}<br>score %{customdata[3]:.3g}"
        "<extra></extra>",
    )


def _style_locations(fig, maps, top_k: int, *, shared_scale: bool, title: str | None, x_px: float) -> None:
    """The shared depth axis, the colour axes (rank; the score when shared), the title and
    a size that gives the plot area ``x_px`` pixels across."""
    fig.update_yaxes(range=[-0.06, 1.06], dtick=0.1, tickformat=".1f", zeroline=False, showgrid=True)
    fig.update_yaxes(title_text="relative depth  (layer / (L − 1); 0 = first, 1 = last)", row=1, col=1)
    fig.update_annotations(font_size=12)
    layout = dict(coloraxis2=_rank_coloraxis(top_k))
    if shared_scale:
        layout["coloraxis"] = _score_coloraxis(maps[0].label)
    what = "score" if not shared_scale else maps[0].label.replace("<br>", " ")
    width = int(x_px + 80 + 90 + 40 * len(maps))
    note = (f"colour: {what} per head; red boxes: each model's top {top_k}; right: the same heads of all "
            "models on one depth axis (colour and size: rank)")
    lines = wrap_label(note, max(40, int(width / 6.5))).split("<br>")  # ~6.5 px per character at 12 px
    fig.update_layout(
        **layout,
        title=title or "Where the contextual heads sit, by relative depth" + "".join(f"<br><sup>{x}</sup>" for x in lines),
        template="plotly_white",
        margin=dict(t=130 + 18 * len(lines), b=130, l=80, r=90),
        width=width,
        height=760,
    )


def _rank_coloraxis(top_k: int) -> dict:
    """The strip's colour axis: rank 1 to ``top_k``, a vertical bar on the right."""
    return dict(
        colorscale="Plasma_r",
        cmin=1,
        cmax=max(top_k, 2),
        colorbar=dict(
            title=dict(text="rank<br>(1 = best)", side="top"),
            thickness=12,
            len=0.6,
            x=1.01,
            y=0.5,
            tickvals=sorted({1, *range(5, top_k + 1, 5)}),
        ),
    )


def _score_coloraxis(label: str) -> dict:
    """The heatmaps' shared colour axis, a horizontal bar under the left panels (0 to 1
    for rank scores, so the best head gets the top colour)."""
    return dict(
        **(dict(cmin=0, cmax=1) if _is_rank(label) else {}),
        colorscale="Viridis",
        colorbar=dict(
            title=dict(text=label, side="top"),
            orientation="h",
            thickness=10,
            len=0.5,
            x=0.3,
            xanchor="center",
            y=-0.1,
            yanchor="top",
            tickfont=dict(size=10),
        ),
    )
