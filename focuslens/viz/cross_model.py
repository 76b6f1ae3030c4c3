"""Cross-model figures: head locations by relative depth, direction norms, direction
similarity and norm vs rank. Each takes the caller's inputs
(``HeadScores``, ``FocusDirections`` or plain rankings, keyed by a display name) and draws
the tables of :mod:`focuslens.viz.compare`; none runs a model. The panels of the
head-location figure are built in :mod:`focuslens.viz.location_panels`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go

from focuslens.errors import DataError
from focuslens.measure.stats import spearman
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
from focuslens.viz.export import Figure
from focuslens.viz.location_panels import (
    _add_depth_strip,
    _add_heat_panel,
    _location_subplots,
    _location_widths,
    _style_locations,
)

__all__ = ["plot_head_locations", "plot_direction_norms", "plot_direction_similarity", "plot_norm_vs_rank"]


# ------------------------------------------------------------------ figure helpers
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
    models: Mapping, *, top_k: int = 20, metric: str | None = None, title: str | None = None,
    marked_layers: Mapping | None = None,
) -> Figure:
    """Where each model's contextual heads sit, on a common relative-depth axis.

    One heatmap per model (heads across, relative depth ``layer / (L − 1)`` up, so models
    of different depth line up; colour: the score, or for any ranking — FocusDirections,
    bare ranking, ``HeadScores.from_ranking`` — one rank score, 1 = best and 0 = last
    ranked: :data:`~focuslens.viz.compare.RANK_LABEL`), the top-k heads boxed
    (numbered by rank where the cells are wide enough).
    The last panel puts every model's top-k heads side by side on the same depth axis:
    marker colour and size show the rank; heads of one layer are spread sideways.

    ``models``: name → HeadScores (``metric``; default "gold", then "rank_score", then its
    first), FocusDirections (its ranking) or ``(ranking, n_layers, n_heads)``.
    ``marked_layers``: name → layers drawn as dashed lines across that model's panel and
    its strip column (e.g. Gemma 3's global-attention layers among its sliding-window ones).
    """
    maps = _head_maps(models, metric)  # every kind of ranking read with one rank encoding
    _check_k(top_k, "top_k")
    top_k = min(top_k, max(len(m.ranking) for m in maps))  # "top 20" of 8 ranked heads says top 8
    top = _top_table(maps, top_k)
    widths, x_px = _location_widths(maps)
    fig = _location_subplots(maps, widths, top_k)
    shared_scale = len({m.label for m in maps}) == 1  # one colour axis for every heatmap
    for col, m in enumerate(maps, start=1):
        cell_px = x_px * widths[col - 1] / m.n_heads
        _add_heat_panel(fig, m, top[top.model == m.name], col, shared_scale=shared_scale, cell_px=cell_px)
    _add_depth_strip(fig, maps, top, top_k)
    for col, m in enumerate(maps, start=1):
        for layer in (marked_layers or {}).get(m.name, ()):
            y = float(relative_depth(layer, m.n_layers))
            fig.add_hline(y=y, line=dict(color="white", width=1.5, dash="dash"), row=1, col=col)
            fig.add_shape(type="line", x0=col - 1.45, x1=col - 0.55, y0=y, y1=y, xref=f"x{len(maps) + 1}",
                          yref=f"y{len(maps) + 1}", line=dict(color="grey", width=1, dash="dash"))
    _style_locations(fig, maps, top_k, shared_scale=shared_scale, title=title, x_px=x_px)
    return Figure(fig)


# ------------------------------------------------------------------ direction norms
def plot_direction_norms(directions, *, band: str = "iqr", title: str | None = None) -> Figure:
    """Per-layer norms of the query (solid) and key (dashed) focus directions against
    relative depth, one colour per model: the median over a layer's heads, with a shaded
    band over the quartiles (``band="iqr"``) or from the min to the max (``band="minmax"``).
    The y axis is logarithmic, so query and key norms of very different size both show;
    the subtitle gives each model's median ‖d_q‖ / median ‖d_k‖."""
    if band not in ("minmax", "iqr"):
        raise DataError(f"band={band!r}: use 'minmax' or 'iqr'.")
    lo, hi = ("min", "max") if band == "minmax" else ("q25", "q75")
    prof = norm_profile(directions)
    floor = _log_floor(prof[[lo, "median", hi]].to_numpy())
    fig = go.Figure()
    ratios = []
    for i, (name, d) in enumerate(_as_directions(directions).items()):
        colour = _colour(i)
        for vector, dash, alpha in (("query", "solid", 0.16), ("key", "dash", 0.10)):
            p = prof[(prof.model == name) & (prof.vector == vector)]
            fig.add_trace(_band_trace(p, name, _rgba(colour, alpha), (lo, hi), floor))
            fig.add_trace(_median_trace(p, name, vector, dict(color=colour, dash=dash), (lo, hi), floor))
        ratios.append(_norm_ratio(name, d))
    _style_norms(fig, prof, band, (lo, hi), floor, ratios, title)
    return Figure(fig)


def _log_floor(values) -> float:
    """What zeros are clipped to on a log axis: half the smallest positive value (1e-6
    when there is none)."""
    return float(values[values > 0].min()) / 2 if (values > 0).any() else 1e-6


def _band_trace(p, name: str, fillcolor: str, band: tuple[str, str], floor: float):
    """The shaded band between the ``band`` columns of one model's norm profile ``p``: a
    closed outline, up along the upper edge and back along the lower."""
    lo, hi = band
    x = p["relative_depth"].to_numpy()
    return go.Scatter(
        x=np.concatenate([x, x[::-1]]),
        y=np.concatenate([p[hi].clip(lower=floor), p[lo].clip(lower=floor)[::-1]]),
        fill="toself",
        fillcolor=fillcolor,
        line=dict(width=0),
        hoverinfo="skip",
        legendgroup=f"{name}",
        showlegend=False,
    )


def _median_trace(p, name: str, vector: str, line: dict, band: tuple[str, str], floor: float):
    """The median line of one model's ``vector`` ("query" or "key") norms, the band's
    edges in its hover; ``line``: its colour and dash."""
    lo, hi = band
    sym = "q" if vector == "query" else "k"
    return go.Scatter(
        x=p["relative_depth"].to_numpy(),
        y=p["median"].clip(lower=floor),
        mode="lines+markers",
        name=f"{name}: {vector} ‖d_{sym}‖",
        legendgroup=f"{name}",
        line=dict(**line, width=2.5 if vector == "query" else 2),
        marker=dict(size=5, symbol="circle" if vector == "query" else "diamond-open"),
        customdata=np.stack([p["layer"], p[lo], p[hi]], axis=-1),
        hovertemplate=f"<b>{name}</b>, {vector}<br>layer %{{customdata[0]}} (depth %{{x:.2f}})"
        f"<br>median %{{y:.3g}}<br>{lo} %{{customdata[1]:.3g}}, {hi} %{{customdata[2]:.3g}}"
        "<extra></extra>",
    )


def _norm_ratio(name: str, d) -> str:
    """``name`` and its median ‖d_q‖ / median ‖d_k‖ over all heads ("∞" for zero keys)."""
    qn, kn = d.q.float().norm(dim=-1).median(), d.k.float().norm(dim=-1).median()
    return f"{name} {float(qn / kn):.3g}×" if kn > 0 else f"{name} ∞"


def _style_norms(fig, prof, band: str, cols: tuple[str, str], floor: float, ratios: list[str], title) -> None:
    """Title (with the band and the ratios), the depth axis, and a log norm axis ticked
    over the band's edges."""
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
            tickvals=_log_ticks(prof[list(cols)].clip(lower=floor).to_numpy()),
            tickformat="~g",
        ),
        template="plotly_white",
        legend=dict(font=dict(size=11), groupclick="toggleitem"),
        margin=dict(t=120),
        width=1000,
        height=600,
    )


# ------------------------------------------------------------------ similarity
def plot_direction_similarity(
    directions, *, heads=None, vector: str = "q", title: str | None = None
) -> Figure:
    """Cosine similarity between the query directions (``vector="k"``: key directions) of
    chosen heads of ONE model: do the contextual heads learn a shared direction, or one
    each? ``heads``: list of (layer, head), an int (top-k of the ranking) or None (top 20
    of the ranking, else every head), shown in that order. Colour: −1 (blue, opposite)
    to +1 (red, same direction); 0 is white."""
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
    order = "heads in rank order" if heads is None and directions.ranking() else "heads as given"
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
