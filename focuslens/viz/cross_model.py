"""Cross-model figures: head locations by relative depth, direction norms, direction
similarity and norm vs rank. Each takes the caller's inputs
(``HeadScores``, ``FocusDirections`` or plain rankings, keyed by a display name) and draws
the tables of :mod:`focuslens.viz.compare`; none runs a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from focuslens.errors import DataError
from focuslens.eval import spearman
from focuslens.viz.compare import (
    _PALETTE,
    _as_directions,
    _check_k,
    _head_maps,
    _top_table,
    cosine_matrix,
    norm_profile,
    norm_rank_table,
    relative_depth,
)
from focuslens.viz.export import Figure, wrap_label

__all__ = ["plot_head_locations", "plot_direction_norms", "plot_direction_similarity", "plot_norm_vs_rank"]


# ------------------------------------------------------------------ figure helpers
def _nice_dtick(n: int, max_ticks: int = 10) -> int:
    """The smallest of 1, 2, 4, 5, 10, 20, ... that keeps ≤ max_ticks ticks on n cells."""
    for step in (1, 2, 4, 5, 10, 20, 25, 50, 100):
        if math.ceil(n / step) <= max_ticks:
            return step
    return math.ceil(n / max_ticks)


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _colour(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


def _log_ticks(values) -> list[float]:
    """Tick values 1, 2, 5 × 10^n covering the positive ``values`` (1, 3 × 10^n when they
    span more than four decades), so a log axis gets no crowded minor labels."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return [1.0]
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    steps = (1, 2, 5) if hi - lo <= 4 else (1, 3)
    return [
        s * 10.0**e for e in range(lo, hi + 1) for s in steps if v.min() / 1.5 <= s * 10.0**e <= v.max() * 1.5
    ]


# ------------------------------------------------------------------ head locations
def plot_head_locations(
    models: Mapping, *, top_k: int = 20, metric: str | None = None, title: str | None = None
) -> Figure:
    """Where each model's contextual heads sit, on a common relative-depth axis.

    One heatmap per model (heads across, relative depth ``layer / (L − 1)`` up, so models
    of different depth line up; colour: the score, or a rank score 1 = best for a bare
    ranking), the top-k heads boxed (numbered by rank where the cells are wide enough).
    The last panel puts every model's top-k heads side by side on the same depth axis:
    marker colour and size show the rank; heads of one layer are spread sideways.

    ``models``: name → HeadScores (``metric``; default "gold", then "rank_score", then its
    first), FocusDirections (its ranking) or ``(ranking, n_layers, n_heads)``.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    maps = _head_maps(models, metric)
    _check_k(top_k, "top_k")
    top = _top_table(maps, top_k)
    n = len(maps)
    heat_w = [max(0.6, min(1.3, m.n_heads / 18)) for m in maps]  # wide enough for 9 and 28 heads
    strip_w = max(1.0, 0.55 * n)
    widths = [w / (sum(heat_w) + strip_w) for w in [*heat_w, strip_w]]
    panel_titles = [f"<b>{wrap_label(m.name, 24)}</b><br>{m.n_layers} layers × {m.n_heads} heads" for m in maps]
    fig = make_subplots(
        rows=1,
        cols=n + 1,
        shared_yaxes=True,
        column_widths=widths,
        horizontal_spacing=0.035,
        subplot_titles=[*panel_titles, f"<b>top {top_k} heads, all models</b><br>same depth axis"],
    )
    shared_scale = len({m.label for m in maps}) == 1
    x_px = 260 * sum(heat_w) + 260 * strip_w  # plot-area width the layout below gives

    for col, m in enumerate(maps, start=1):
        depth = relative_depth(np.arange(m.n_layers), m.n_layers)
        rank_of = {h: r + 1 for r, h in enumerate(m.ranking)}
        custom = np.array(
            [
                [[layer, rank_of.get((layer, head), 0)] for head in range(m.n_heads)]
                for layer in range(m.n_layers)
            ]
        )
        z = m.values.numpy()
        domain = fig.layout[f"xaxis{col if col > 1 else ''}"].domain
        colorbar = dict(
            title=dict(text=m.label, side="top"),
            orientation="h",
            thickness=10,
            x=(domain[0] + domain[1]) / 2,
            xanchor="center",
            len=domain[1] - domain[0],
            y=-0.1,
            yanchor="top",
            tickfont=dict(size=10),
        )
        heat = dict(
            z=z,
            x=np.arange(m.n_heads),
            y=depth,
            customdata=custom,
            name=m.name,
            hovertemplate=f"<b>{m.name}</b><br>layer %{{customdata[0]}} of {m.n_layers}, head %{{x}}"
            "<br>relative depth %{y:.2f}<br>score %{z:.3g}<br>rank %{customdata[1]} (0 = unranked)"
            "<extra></extra>",
        )
        if shared_scale:
            fig.add_trace(go.Heatmap(**heat, coloraxis="coloraxis"), row=1, col=col)
        else:
            fig.add_trace(go.Heatmap(**heat, colorscale="Viridis", colorbar=colorbar), row=1, col=col)
        half = 0.5 * (relative_depth(1, m.n_layers) if m.n_layers > 1 else 1.0)
        cell_px = x_px * widths[col - 1] / m.n_heads
        sub = top[top.model == m.name]
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

    # the shared-axis strip: one column per model, heads of a layer spread sideways
    for i, m in enumerate(maps):
        sub = top[top.model == m.name].copy()
        within = sub.groupby("layer").cumcount().to_numpy()
        count = sub.groupby("layer")["layer"].transform("size").to_numpy()
        sub["x"] = i + np.clip((within - (count - 1) / 2) * 0.09, -0.42, 0.42)
        fig.add_trace(
            go.Scatter(
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
            ),
            row=1,
            col=n + 1,
        )
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
    fig.update_yaxes(range=[-0.06, 1.06], dtick=0.1, tickformat=".1f", zeroline=False, showgrid=True)
    fig.update_yaxes(title_text="relative depth  (layer / (L − 1); 0 = first, 1 = last)", row=1, col=1)
    fig.update_annotations(font_size=12)

    layout = dict(
        coloraxis2=dict(
            colorscale="Plasma_r",
            cmin=1,
            cmax=max(top_k, 2),
            colorbar=dict(
                title=dict(text="rank", side="top"),
                thickness=12,
                len=0.6,
                x=1.01,
                y=0.5,
                tickvals=sorted({1, *range(5, top_k + 1, 5)}),
            ),
        ),
    )
    if shared_scale:
        layout["coloraxis"] = dict(
            colorscale="Viridis",
            colorbar=dict(
                title=dict(text=maps[0].label, side="top"),
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
    what = "score" if not shared_scale else maps[0].label.replace("<br>", " ")
    fig.update_layout(
        **layout,
        title=title
        or "Where the contextual heads sit, by relative depth"
        f"<br><sup>colour: {what} per head; red boxes: each model's top {top_k}; "
        "right: the same heads of all models on one depth axis (colour and size: rank)</sup>",
        template="plotly_white",
        margin=dict(t=150, b=130, l=80, r=90),
        width=int(x_px + 80 + 90 + 40 * n),
        height=760,
    )
    return Figure(fig)


# ------------------------------------------------------------------ direction norms
def plot_direction_norms(directions, *, band: str = "iqr", title: str | None = None) -> Figure:
    """Per-layer norms of the query (solid) and key (dashed) focus directions against
    relative depth, one colour per model: the median over a layer's heads, with a shaded
    band over the quartiles (``band="iqr"``) or from the min to the max (``band="minmax"``).
    The y axis is logarithmic, so query and key norms of very different size both show;
    the subtitle gives each model's median ‖d_q‖ / median ‖d_k‖."""
    import plotly.graph_objects as go

    if band not in ("minmax", "iqr"):
        raise DataError(f"band={band!r}: use 'minmax' or 'iqr'.")
    lo, hi = ("min", "max") if band == "minmax" else ("q25", "q75")
    prof = norm_profile(directions)
    positive = prof[[lo, "median", hi]].to_numpy()
    floor = float(positive[positive > 0].min()) / 2 if (positive > 0).any() else 1e-6  # log axis: no zeros
    fig = go.Figure()
    ratios = []
    for i, (name, d) in enumerate(_as_directions(directions).items()):
        colour = _colour(i)
        for vector, dash, alpha in (("query", "solid", 0.16), ("key", "dash", 0.10)):
            p = prof[(prof.model == name) & (prof.vector == vector)]
            x = p["relative_depth"].to_numpy()
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([x, x[::-1]]),
                    y=np.concatenate([p[hi].clip(lower=floor), p[lo].clip(lower=floor)[::-1]]),
                    fill="toself",
                    fillcolor=_rgba(colour, alpha),
                    line=dict(width=0),
                    hoverinfo="skip",
                    legendgroup=f"{name}",
                    showlegend=False,
                )
            )
            sym = "q" if vector == "query" else "k"
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=p["median"].clip(lower=floor),
                    mode="lines+markers",
                    name=f"{name}: {vector} ‖d_{sym}‖",
                    legendgroup=f"{name}",
                    line=dict(color=colour, dash=dash, width=2.5 if vector == "query" else 2),
                    marker=dict(size=5, symbol="circle" if vector == "query" else "diamond-open"),
                    customdata=np.stack([p["layer"], p[lo], p[hi]], axis=-1),
                    hovertemplate=f"<b>{name}</b>, {vector}<br>layer %{{customdata[0]}} (depth %{{x:.2f}})"
                    f"<br>median %{{y:.3g}}<br>{lo} %{{customdata[1]:.3g}}, {hi} %{{customdata[2]:.3g}}"
                    "<extra></extra>",
                )
            )
        qn, kn = d.q.float().norm(dim=-1).median(), d.k.float().norm(dim=-1).median()
        ratios.append(f"{name} {float(qn / kn):.3g}×" if kn > 0 else f"{name} ∞")
    band_text = "min–max over heads" if band == "minmax" else "interquartile range over heads"
    fig.update_layout(
        title=title
        or "Norms of the focus directions by depth: query vs key"
        f"<br><sup>line: median over a layer's heads, band: {band_text}; "
        "solid: query ‖d_q‖, dashed: key ‖d_k‖"
        f"<br>median ‖d_q‖ / median ‖d_k‖: {'; '.join(ratios)}</sup>",
        xaxis=dict(
            title="relative depth  (layer / (L − 1); 0 = first, 1 = last)", range=[-0.02, 1.02], dtick=0.1
        ),
        yaxis=dict(
            title="L2 norm of the direction (log scale)",
            type="log",
            tickvals=_log_ticks(prof[[lo, hi]].clip(lower=floor).to_numpy()),
            tickformat="~g",
        ),
        template="plotly_white",
        legend=dict(font=dict(size=11), groupclick="toggleitem"),
        margin=dict(t=120),
        width=1000,
        height=600,
    )
    return Figure(fig)


# ------------------------------------------------------------------ similarity
def plot_direction_similarity(
    directions, *, heads=None, vector: str = "q", title: str | None = None
) -> Figure:
    """Cosine similarity between the query directions (``vector="k"``: key directions) of
    chosen heads of ONE model: do the contextual heads learn a shared direction, or one
    each? ``heads``: list of (layer, head), an int (top-k of the ranking) or None (top 20
    of the ranking, else every head), shown in that order. Colour: −1 (blue, opposite)
    to +1 (red, same direction); 0 is white."""
    import plotly.graph_objects as go

    sim = cosine_matrix(directions, heads, vector=vector)
    n = len(sim)
    off = sim.to_numpy()[~np.eye(n, dtype=bool)]
    off = off[np.isfinite(off)]
    summary = f"mean off-diagonal cosine {off.mean():+.2f}, max {off.max():+.2f}" if off.size else ""
    font = 11 if n <= 25 else max(6, int(11 * 25 / n))
    fig = go.Figure(
        go.Heatmap(
            z=sim.to_numpy(),
            x=list(sim.columns),
            y=list(sim.index),
            zmin=-1,
            zmax=1,
            zmid=0,
            colorscale="RdBu_r",
            colorbar=dict(title=dict(text="cosine", side="right"), tickvals=[-1, -0.5, 0, 0.5, 1]),
            hovertemplate="%{y} · %{x}<br>cosine %{z:.3f}<extra></extra>",
        )
    )
    if n <= 25:
        fig.update_traces(text=np.round(sim.to_numpy(), 2), texttemplate="%{text:.1f}", textfont=dict(size=8))
    which = {"q": "query", "k": "key"}[vector]
    order = "heads in rank order" if heads is None and directions.ranking else "heads as given"
    fig.update_layout(
        title=title
        or f"Cosine similarity of the {which} focus directions: {directions.model or 'model'}"
        f"<br><sup>{n} heads ({order}); {summary}</sup>",
        xaxis=dict(title="head (L = layer, H = head)", tickangle=-60, tickfont=dict(size=font)),
        yaxis=dict(title="head", autorange="reversed", tickfont=dict(size=font), scaleanchor="x"),
        template="plotly_white",
        margin=dict(t=100),
        width=max(560, 240 + 26 * min(n, 40)),
        height=max(520, 200 + 26 * min(n, 40)),
    )
    return Figure(fig)


# ------------------------------------------------------------------ norm vs rank
def plot_norm_vs_rank(directions, *, x: str = "relative", title: str | None = None) -> Figure:
    """‖d_q‖ of every ranked head against its contextual rank, one trace per model,
    with the Spearman correlation between rank and norm in the legend (ρ < 0: the
    best-ranked heads have larger query directions; ρ > 0: smaller).
    ``x="relative"``: rank / number of heads, so models of different size line up;
    ``x="rank"``: the rank itself on a log axis."""
    import plotly.graph_objects as go

    if x not in ("relative", "rank"):
        raise DataError(f"x={x!r}: use 'relative' or 'rank'.")
    table = norm_rank_table(directions)
    col = "relative_rank" if x == "relative" else "rank"
    fig = go.Figure()
    for i, (name, sub) in enumerate(table.groupby("model", sort=False)):
        rho = spearman(sub["rank"], sub["q_norm"])
        fig.add_trace(
            go.Scatter(
                x=sub[col],
                y=sub["q_norm"],
                mode="markers",
                name=f"{name} (Spearman ρ = {rho:+.2f}, n = {len(sub)})",
                marker=dict(color=_colour(i), size=6, opacity=0.55),
                customdata=np.stack([sub["layer"], sub["head"], sub["rank"]], axis=-1),
                hovertemplate=f"<b>{name}</b><br>L%{{customdata[0]}}H%{{customdata[1]}}, "
                "rank %{customdata[2]}<br>‖d_q‖ %{y:.3g}<extra></extra>",
            )
        )
    xaxis = (
        dict(
            title="relative contextual rank  (rank / number of heads; small = best)",
            range=[0, 1.02],
            dtick=0.1,
        )
        if x == "relative"
        else dict(
            title="contextual rank (1 = best, log scale)",
            type="log",
            tickvals=_log_ticks(table["rank"]),
            tickformat="~g",
        )
    )
    fig.update_layout(
        title=title
        or "Query-direction norm vs contextual rank"
        "<br><sup>one point per head; Spearman ρ between rank and ‖d_q‖ in the legend"
        "<br>ρ < 0: the best-ranked heads have larger query directions; ρ > 0: smaller</sup>",
        xaxis=xaxis,
        yaxis=dict(
            title="‖d_q‖ (L2 norm, log scale)",
            type="log",
            tickvals=_log_ticks(table["q_norm"]),
            tickformat="~g",
        ),
        legend=dict(orientation="h", x=0, y=-0.15, yanchor="top", font=dict(size=11)),
        template="plotly_white",
        margin=dict(t=110, b=140),
        width=950,
        height=640,
    )
    return Figure(fig)
