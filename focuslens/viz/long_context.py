"""Long-context figures: accuracy and gold mass vs context length, and the slot profile.

At thousands of tokens a token × token view is unreadable (and its pattern does not fit);
these views aggregate instead: per context length, and per document *slot* × layer (the
mean attention mass from the answer rows onto the document in each slot, the "attention
basin" profile of Yi et al., arXiv 2508.05128) or slot × head for chosen heads.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from focuslens.measure.stats import wilson_interval
from focuslens.viz.export import Figure

__all__ = ["plot_long_context", "plot_long_context_positions", "plot_slot_profile"]

_COLOURS = {"nq": "#1f77b4", "kv": "#d62728", "needle": "#2ca02c"}
_POSITION_COLOURS = {"first": "#1f77b4", "middle": "#ff7f0e", "last": "#2ca02c"}
_POSITION_SHIFT = {"first": 0.96, "middle": 1.0, "last": 1.04}
_TICKS = [1000, 2000, 4000, 8000]


def _cells(rows: pd.DataFrame) -> pd.DataFrame:
    ok = rows[rows["skipped"].isna()] if "skipped" in rows.columns else rows
    g = ok.groupby(["task", "size"]).agg(n=("correct", "size"), tokens=("n_tokens", "mean"),
                                          accuracy=("correct", "mean"), split=("split_correct", "mean"),
                                          gold_mass=("top_gold_mass", "mean"))
    return g.reset_index().sort_values(["task", "tokens"])


def _ci_trace(x, p, n, name: str, colour: str, dash: str, legend: bool):
    lo_hi = [wilson_interval(float(a), int(m)) for a, m in zip(p, n)]
    return go.Scatter(x=x, y=p, name=name, mode="lines+markers", line={"color": colour, "dash": dash},
                      showlegend=legend, error_y={"type": "data", "symmetric": False,
                                                   "array": [hi - a for a, (_, hi) in zip(p, lo_hi)],
                                                   "arrayminus": [a - lo for a, (lo, _) in zip(p, lo_hi)]})


def plot_long_context(rows: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Two panels from the long-context stage's rows: accuracy (solid: unsteered, dashed:
    split-softmax on the top-k heads; Wilson 95 % CIs) and the top heads' gold mass, both
    against the mean prompt length in tokens, one colour per task."""
    cells = _cells(rows)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Accuracy (95% Wilson CI)", "Top heads' gold mass"))
    for task, g in cells.groupby("task", sort=False):
        colour = _COLOURS.get(task, "#7f7f7f")
        fig.add_trace(_ci_trace(g.tokens, g.accuracy, g.n, f"{task}", colour, "solid", True), 1, 1)
        # shifted 4 % right (log axis) so the two series' intervals do not hide each other
        fig.add_trace(_ci_trace(g.tokens * 1.04, g.split, g.n, f"{task} + split-softmax", colour, "dash", True), 1, 1)
        fig.add_trace(go.Scatter(x=g.tokens, y=g.gold_mass, mode="lines+markers", line={"color": colour},
                                 name=task, showlegend=False), 1, 2)
    for col in (1, 2):
        fig.update_xaxes(title_text="prompt length (tokens)", type="log", row=1, col=col)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", title_text="mean mass on the gold document", row=1, col=2)
    fig.update_layout(title=title or "Distraction at long context", template="plotly_white", width=1000, height=450)
    return Figure(fig)


def plot_long_context_positions(rows: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Where the gold position matters: one column per task; top, accuracy by gold position
    (first / middle / last; solid: unsteered, dashed: split-softmax on the top-k heads;
    Wilson 95 % CIs over that position's prompts); bottom, the top heads' gold mass by
    position; both against the mean prompt length in tokens."""
    ok = rows[rows["skipped"].isna()] if "skipped" in rows.columns else rows
    cells = (ok.groupby(["task", "size", "position"])
             .agg(n=("correct", "size"), tokens=("n_tokens", "mean"), accuracy=("correct", "mean"),
                  split=("split_correct", "mean"), gold_mass=("top_gold_mass", "mean"))
             .reset_index().sort_values(["task", "tokens"]))
    tasks = list(dict.fromkeys(cells["task"]))
    fig = make_subplots(rows=2, cols=len(tasks), subplot_titles=tasks, vertical_spacing=0.12)
    for col, task in enumerate(tasks, start=1):
        for position, g in cells[cells.task == task].groupby("position", sort=False):
            colour, legend = _POSITION_COLOURS.get(position, "#7f7f7f"), col == 1
            x = g.tokens * _POSITION_SHIFT.get(position, 1.0)  # (log axis) so the intervals do not hide each other
            fig.add_trace(_ci_trace(x, g.accuracy, g.n, f"gold {position}", colour, "solid", legend), 1, col)
            fig.add_trace(_ci_trace(x * 1.02, g.split, g.n, f"gold {position} + split-softmax", colour, "dash",
                                    legend), 1, col)
            fig.add_trace(go.Scatter(x=g.tokens, y=g.gold_mass, mode="lines+markers", line={"color": colour},
                                     name=f"gold {position}", showlegend=False), 2, col)
        ticks = {"type": "log", "tickvals": _TICKS, "ticktext": [f"{t // 1000}k" for t in _TICKS]}
        fig.update_xaxes(**ticks, row=1, col=col)
        fig.update_xaxes(**ticks, title_text="prompt length (tokens)", row=2, col=col)
        fig.update_yaxes(range=[0, 1.02], row=1, col=col)
        fig.update_yaxes(rangemode="tozero", row=2, col=col)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_yaxes(title_text="top heads' gold mass", row=2, col=1)
    fig.update_layout(title=title or "Distraction at long context by gold position", template="plotly_white",
                      width=1200, height=750)
    return Figure(fig)


def plot_slot_profile(sums: torch.Tensor, n: int, *, heads=None, title: str | None = None) -> Figure:
    """Mean attention mass from the answer rows onto each document slot: ``sums``
    ``[layer, head, slot]`` summed over ``n`` prompts. Slot × layer (mean over heads), or
    slot × head for ``heads`` ``[(layer, head), ...]``."""
    mean = sums.float() / max(n, 1)
    if heads is None:
        z, y = mean.mean(1), [f"L{layer}" for layer in range(mean.shape[0])]
    else:
        z = torch.stack([mean[layer, head] for layer, head in heads])
        y = [f"L{layer}H{head}" for layer, head in heads]
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=[str(i + 1) for i in range(z.shape[1])], y=y, colorscale="Viridis",
                               colorbar={"title": "mass"}))
    fig.update_layout(title=title or f"Attention mass by document slot ({n} prompts)", template="plotly_white",
                      xaxis_title="document slot", yaxis_title="layer" if heads is None else "head",
                      width=900, height=600)
    fig.update_yaxes(autorange="reversed" if heads is not None else True)
    return Figure(fig)
