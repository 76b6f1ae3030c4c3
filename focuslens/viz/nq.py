"""The NQ focus-direction experiment in one figure (:mod:`focuslens.experiments.nq`): paired
gains of every condition over the unsteered model with question-clustered 95 % CIs, per gold
position, at each document count; and where the chosen heads' attention goes."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from focuslens.viz.export import Figure

__all__ = ["plot_nq_focus", "plot_nq_training"]

_LABELS = {"focus": "focus<br>(chosen k, α)", "negative_alpha": "−α", "random_directions": "random<br>directions",
           "random_heads": "random<br>heads", "magnitude_control": "magnitude<br>control",
           "split_softmax": "split-softmax<br>(label)", "random_heads_unsteered": "random heads,<br>unsteered"}
_POSITION_COLOURS = {"all": "#1f77b4", "first": "#9ecae1", "middle": "#fdae6b", "last": "#a1d99b"}
_MASS_COLOURS = {"gold_mass": "#2ca02c", "sink_mass": "#7f7f7f", "irrelevant_mass": "#d62728"}


def plot_nq_focus(table: pd.DataFrame, summary: dict, *, title: str | None = None) -> Figure:
    """Rows: log-prob gain (nats), EM gain (points), attention mass of the chosen heads;
    columns: the test document counts. ``table``: the ``nq_focus.csv`` rows."""
    docs = sorted(table.documents.unique())
    titles = [f"{what}, {n} documents" for what in ("gold log-prob gain (nats)", "exact-match gain (points)",
                                                    "steered heads' attention from the answer rows") for n in docs]
    fig = make_subplots(rows=3, cols=len(docs), subplot_titles=titles, vertical_spacing=0.11, horizontal_spacing=0.07)
    for c, n in enumerate(docs, start=1):
        for r, (metric, scale) in enumerate((("logprob", 1.0), ("em", 100.0)), start=1):
            sub = table[(table.documents == n) & (table.metric == metric)]
            if sub.empty:  # e.g. no greedy answers at this document count: say so, not an empty frame
                axes = fig.get_subplot(r, c)  # the panel's centre in paper coordinates
                fig.add_annotation(text=f"not measured at {n} documents<br>(log-prob only)", showarrow=False,
                                   font={"size": 14, "color": "#666"}, xref="paper", yref="paper",
                                   x=sum(axes.xaxis.domain) / 2, y=sum(axes.yaxis.domain) / 2)
                fig.update_xaxes(visible=False, row=r, col=c)
                fig.update_yaxes(visible=False, row=r, col=c)
                continue
            for pos, colour in _POSITION_COLOURS.items():
                part = sub[sub.position == pos]
                fig.add_trace(go.Bar(
                    x=[_LABELS.get(x, x) for x in part.condition], y=scale * part.gain, name=pos, marker_color=colour,
                    legendgroup=pos, showlegend=(r == 1 and c == 1),
                    error_y={"type": "data", "symmetric": False, "array": scale * (part.gain_high - part.gain),
                             "arrayminus": scale * (part.gain - part.gain_low)},
                    hovertemplate="%{x}<br>gain %{y:.3f}<extra>" + pos + "</extra>"), row=r, col=c)
            fig.add_hline(y=0, line_color="black", line_width=1, row=r, col=c)
        masses = summary["by_documents"][str(n)]["masses"]
        conds = [x for x in ("unsteered", "focus", "negative_alpha", "magnitude_control", "random_directions",
                             "split_softmax", "random_heads_unsteered", "random_heads") if x in masses]
        for name, colour in _MASS_COLOURS.items():
            fig.add_trace(go.Bar(x=[_LABELS.get(x, x) for x in conds], y=[masses[x]["all"].get(name) for x in conds],
                                 name=name.replace("_mass", ""), marker_color=colour, legendgroup=name,
                                 showlegend=c == 1), row=3, col=c)
    ch = summary["chosen"]
    fig.update_layout(
        barmode="group", template="plotly_white", height=1100, width=max(1000, 760 * len(docs)),
        title=title or (f"Focus directions on NQ (SmolLM2; {summary['n_train_questions']} training questions, "
                        f"{summary['n_test_questions']} test questions × first/middle/last)<br><sup>k={ch['k']}, "
                        f"α={ch['alpha']:g} chosen on validation; answer rows steered; 95% CIs over questions</sup>"),
        legend={"orientation": "h", "y": -0.07})
    fig.update_xaxes(tickangle=0, tickfont={"size": 11})
    return Figure(fig)


def plot_nq_training(history: list[dict], *, title: str | None = None) -> Figure:
    """The training curve of the NQ directions: mean validation gold mass of every head
    (the early-stopping signal) and the mean ‖d_q‖, per epoch."""
    df = pd.DataFrame(history)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation gold mass (mean over heads)", "mean ‖d_q‖"))
    if "val_gold_mass" in df:
        fig.add_trace(go.Scatter(x=df.epoch, y=df.val_gold_mass, mode="lines+markers", name="validation"), row=1, col=1)
    fig.add_trace(go.Scatter(x=df.epoch, y=df.train_gold_mass, mode="lines+markers", name="training"), row=1, col=1)
    if "dq_norm_mean" in df:
        fig.add_trace(go.Scatter(x=df.epoch, y=df.dq_norm_mean, mode="lines+markers", name="‖d_q‖",
                                 showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(template="plotly_white", height=380, width=1000,
                      title=title or "Training focus directions on NQ (SmolLM2, disk-streamed cache)")
    return Figure(fig)
