"""The model-family comparison in one figure, from the ``"families"`` summary section
(:func:`focuslens.experiments.families.families_summary`): four panels, one colour per model.

1. Distraction: accuracy vs the number of documents (Wilson 95 % CIs).
2. Split-softmax (τ = 0.1) on the top-k contextual heads vs k random heads, against the
   unsteered model (with the label: the ceiling of what attention to the gold can do).
3. Focus directions (no label): the validation-chosen (k, α) on the test prompts vs the
   unsteered model.
4. Where the top-20 contextual heads sit: relative depth (median and quartiles), and the
   share of them in global-attention layers where a model has sliding-window ones.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.viz.compare import _PALETTE
from focuslens.viz.export import Figure

__all__ = ["plot_families"]


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
                               (1, "focus", (("unsteered", "baseline"), ("focus", "test")))):
            if key not in c:
                continue
            cell = c[key]
            row = 1 if key == "split_softmax" else 2
            label = f"k={cell['k']}" + (f", α={cell['alpha']:g}" if key == "focus" else "")
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
