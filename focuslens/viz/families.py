"""The model-family comparison in one figure, from the ``"families"`` summary section
(:func:`focuslens.experiments.families.families_summary`): four panels, one colour per model.

1. Distraction: accuracy vs the number of documents (Wilson 95 % CIs).
2. Split-softmax (τ = 0.1) on the top-k contextual heads vs k random heads, against the
   unsteered model (with the label: the ceiling of what attention to the gold can do).
3. Focus directions (no label): the validation-chosen (k, α) on the test prompts vs the
   unsteered model, steering the answer rows and (where run) every row.
4. Where the top-20 contextual heads sit: relative depth (median and quartiles), and the
   share of them in global-attention layers where a model has sliding-window ones.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.errors import DataError
from focuslens.viz.compare import _PALETTE
from focuslens.viz.export import Figure

__all__ = ["plot_families", "plot_family_key_bias"]


def _err(p: float, ci) -> dict:
    return {"type": "data", "symmetric": False, "array": [ci[1] - p], "arrayminus": [p - ci[0]]}


def plot_families(summary: dict, *, title: str | None = None) -> Figure:
    """The four panels of the module docstring from a ``"families"`` summary section."""
    models = summary["models"]
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.12, vertical_spacing=0.2, subplot_titles=(
        "Distraction (95% Wilson CI)", "Split-softmax τ=0.1 (with the label)",
        "Focus directions (validation-chosen cell, test)", "Top-20 contextual heads: relative depth"))
    for i, (name, c) in enumerate(models.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        if "distraction" in c:
            cells = sorted(c["distraction"].items(), key=lambda kv: int(kv[0]))
            fig.add_trace(go.Scatter(
                x=[int(k) for k, _ in cells], y=[v["accuracy"] for _, v in cells], name=name, mode="lines+markers",
                line={"color": colour}, legendgroup=name,
                error_y={"type": "data", "symmetric": False, "array": [v["ci"][1] - v["accuracy"] for _, v in cells],
                         "arrayminus": [v["accuracy"] - v["ci"][0] for _, v in cells]}), 1, 1)
        for col, key, bars in ((2, "split_softmax", (("unsteered", "baseline"), ("random k", "random_k"),
                                                      ("top-k", "top_k"))),
                               (1, "focus", (("unsteered", "baseline"), ("focus", "test"))),
                               (1, "focus_all_rows", (("focus, all rows", "test"),))):
            if key not in c:
                continue
            cell = c[key]
            row = 1 if key == "split_softmax" else 2
            label = f"k={cell['k']}" + (f", α={cell['alpha']:g}" if key != "split_softmax" else "")
            for j, (what, field) in enumerate(bars):
                p = cell[field]
                fig.add_trace(go.Bar(x=[f"{what}"], y=[p], name=name, legendgroup=name, showlegend=False,
                                     marker={"color": colour, "opacity": 0.45 + 0.55 * j / max(len(bars) - 1, 1)},
                                     error_y=_err(p, cell[f"{field}_ci"]), offsetgroup=str(i),
                                     hovertemplate=f"{name}<br>{what} ({label}): %{{y:.3f}}<extra></extra>"),
                              row, col)
        if "heads" in c:
            h = c["heads"]
            q1, q3 = h["relative_depth_quartiles"]
            share = h.get("share_in_global_layers")
            text = f"{share:.0%} in global layers" if share is not None else ""
            fig.add_trace(go.Scatter(
                x=[h["relative_depth_median"]], y=[name], mode="markers+text", text=[text], textposition="top center",
                marker={"color": colour, "size": 12}, showlegend=False, legendgroup=name,
                error_x={"type": "data", "symmetric": False, "array": [q3 - h["relative_depth_median"]],
                         "arrayminus": [h["relative_depth_median"] - q1]}), 2, 2)
    counts = sorted({int(k) for c in models.values() for k in c.get("distraction", {})})
    fig.update_xaxes(type="log", title_text="documents in the prompt", tickvals=counts, ticktext=[str(n) for n in counts],
                     row=1, col=1)
    for row, col in ((1, 1), (1, 2), (2, 1)):
        fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=row, col=col)
    fig.update_xaxes(range=[-0.02, 1.02], title_text="relative depth (0 = first layer, 1 = last)", row=2, col=2)
    fig.update_layout(barmode="group", template="plotly_white", width=1100, height=800,
                      title=title or "Two trained families, one recipe")
    return Figure(fig)


def plot_family_key_bias(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """What each model's trained focus directions favour on **one** prompt: the key bias
    ``b_j = α·d_q·k_j/√d`` of its top heads averaged over each part's tokens (sink, every
    document, question; :func:`~focuslens.directions.artifact.bias_by_part`), mean ± s.d.
    over the heads, one panel per model, the gold document in gold. ``table``: columns
    ``model``, ``part``, ``mean``, ``sd``, ``gold`` (bool), ``alpha``, ``n_heads``
    (``families_key_bias.csv``)."""
    need = {"model", "part", "mean", "sd", "gold", "alpha", "n_heads"}
    if not need <= set(table.columns):
        raise DataError(f"table lacks columns {sorted(need - set(table.columns))} (families_key_bias.csv has them).")
    models = list(dict.fromkeys(table.model))
    if not models:
        raise DataError("table is empty: no model had trained directions and a prompt view.")
    fig = make_subplots(rows=len(models), cols=1, vertical_spacing=0.25 / len(models), subplot_titles=[
        f"{m}: top {int(g.n_heads.iloc[0])} heads of its ranking, α = {float(g.alpha.iloc[0]):g}"
        for m, g in table.groupby("model", sort=False)])
    for r, (name, g) in enumerate(table.groupby("model", sort=False), start=1):
        gold = g.gold.astype(bool).to_numpy()
        colours = ["#FFD700" if is_gold else _PALETTE[(r - 1) % len(_PALETTE)] for is_gold in gold]
        fig.add_trace(go.Bar(x=g.part.tolist(), y=g["mean"].tolist(), marker={"color": colours,
                             "line": {"color": ["#B22222" if x else "rgba(0,0,0,0)" for x in gold], "width": 2}},
                             error_y={"type": "data", "array": g["sd"].tolist(), "thickness": 1, "color": "#444"},
                             name=name, showlegend=False,
                             hovertemplate=f"{name}<br>%{{x}}: mean bias %{{y:+.3f}}<extra></extra>"), r, 1)
        fig.update_yaxes(title_text="mean logit bias", zeroline=True, zerolinecolor="#444", row=r, col=1)
        fig.update_xaxes(type="category", row=r, col=1)
    fig.update_layout(template="plotly_white", width=1000, height=140 + 300 * len(models),
                      title=title or ("The same prompt, each family's focus directions: the bias they add to each "
                                      "part's keys<br><sup>gold bar, red outline: the document with the answer; "
                                      "error bars: s.d. over the heads</sup>"))
    return Figure(fig)
