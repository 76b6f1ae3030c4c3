"""Figures of one prompt: where the answer rows look, and what a focus direction favours.

Each figure draws a measurement made beforehand (figures never run the model):

* :func:`plot_document_attention` — heads × prompt parts (sink, instruction, each
  document, question) from :func:`~focuslens.measure.scoring.prompt_span_masses`: attention mass
  from the answer rows, gold document boxed.
* :func:`token_view` — the same mass token by token over a window of the prompt
  (:func:`~focuslens.measure.scoring.token_masses`), as an interactive circuitsvis view (its
  JavaScript inlined, so it works offline).
* :func:`plot_key_bias` — the logit bias ``α·d_q·k_j/√d`` a focus direction adds to every
  key (:meth:`~focuslens.directions.artifact.FocusDirections.key_bias`), over the documents, with
  the mean per document.

>>> masses = prompt_span_masses(model, prompt, 20, ranking=scores.ranking())  # doctest: +SKIP
>>> plot_document_attention(masses, prompt)                                  # doctest: +SKIP

Token strings are HTML-escaped before they reach circuitsvis (it injects them as HTML, so
``<bos>`` would otherwise vanish), and plotly axes use unique labels or positions (a
categorical axis merges equal labels).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from focuslens.data.render import Prompt, Span
from focuslens.directions.artifact import bias_by_part
from focuslens.errors import DataError
from focuslens.io import write_atomic
from focuslens.viz.export import Figure

__all__ = ["AttentionHTML", "plot_document_attention", "plot_key_bias", "token_view"]

_GOLD_OUTLINE = "#d62728"
_GOLD_FILL = "#f2b701"


# ------------------------------------------------------------------ labels and spans
def _head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _doc_label(prompt: Prompt, i: int, *, short: bool = False) -> str:
    """``Doc i`` (1-based, as the prompt numbers them); the gold one is starred."""
    name = str(i + 1) if short else f"Doc {i + 1}"
    if i != prompt.gold_index:
        return name
    return f"★{i + 1}" if short else f"{name} ★ gold"


def _part_labels(prompt: Prompt) -> list[str]:
    """Column labels in :func:`prompt_span_masses` order: sink, instruction, docs, question."""
    return ["sink", "instruction", *(_doc_label(prompt, i) for i in range(len(prompt.documents))), "question"]


def _model_name(frame: pd.DataFrame, name: str | None) -> str:
    """The model a measurement came from: ``name``, else the frame's ``attrs["model"]``."""
    return html.escape(name or frame.attrs.get("model", "the model"))


def _heads_of(frame: pd.DataFrame, what: str) -> list[tuple[int, int]]:
    """The (layer, head) index of a per-head measurement, checked."""
    if not isinstance(frame, pd.DataFrame) or list(frame.index.names) != ["layer", "head"]:
        raise DataError(f"{what} must be a DataFrame indexed by (layer, head), as "
                        "prompt_span_masses / token_masses / FocusDirections.key_bias return.")
    if frame.empty:
        raise DataError(f"{what} has no heads.")
    return [(int(layer), int(head)) for layer, head in frame.index]


def _positions(frame: pd.DataFrame, what: str, prompt: Prompt) -> list[int]:
    """The key positions a per-token measurement has columns for, checked against ``prompt``."""
    try:
        positions = [int(c) for c in frame.columns]
    except (TypeError, ValueError):
        raise DataError(f"{what}: columns must be token positions, got {list(frame.columns)[:3]}…") from None
    if not positions or min(positions) < 0 or max(positions) >= prompt.n_tokens:
        raise DataError(f"{what}: positions {positions[:1]}…{positions[-1:]} are not tokens of the prompt "
                        f"({prompt.n_tokens} tokens): was it measured on another prompt?")
    return positions


def _short(text: str, n: int = 60) -> str:
    """``text`` on one line, at most ``n`` characters, HTML-escaped (for titles)."""
    text = " ".join(text.split())
    return html.escape(text if len(text) <= n else text[: n - 1] + "…")


def _token_texts(tokenizer, prompt: Prompt, span: Span) -> list[str]:
    """The prompt's text cut at token starts, so each token carries the whitespace that
    follows it (newlines then break the line after the right token). Tokens without
    characters (an added ``<bos>``) fall back to the tokenizer's token string."""
    starts = [a if b > a else None for a, b in prompt.char_offsets]
    texts = []
    for i in span:
        nxt = next((s for s in starts[i + 1 :] if s is not None), len(prompt.text))
        piece = prompt.text[starts[i] : nxt] if starts[i] is not None else ""
        texts.append(piece or tokenizer.convert_ids_to_tokens(int(prompt.input_ids[i])))
    return texts


def _span_names(prompt: Prompt, span: Span) -> str:
    """The parts of the prompt a token window touches, e.g. ``"instruction, Doc 1–2"``."""

    def touches(s: Span) -> bool:
        return s.start < span.end and s.end > span.start

    docs = [i + 1 for i, d in enumerate(prompt.documents) if touches(d)]
    names = [name for name in ("sink", "instruction") if touches(getattr(prompt, name))]
    if docs:
        names.append(f"Doc {docs[0]}" if len(docs) == 1 else f"Doc {docs[0]}–{docs[-1]}")
    names += [name for name in ("question", "answer") if touches(getattr(prompt, name))]
    return ", ".join(names) or "template tokens"


# ------------------------------------------------------------------ 1. document map
def plot_document_attention(masses: pd.DataFrame, prompt: Prompt, *, title: str | None = None,
                            model_name: str | None = None) -> Figure:
    """Heatmap of where each head's answer rows look: one row per head (``L{l}H{h}``), one
    column per part of the prompt (sink, instruction, ``Doc 1`` … ``Doc N``, question).

    ``masses``: :func:`~focuslens.measure.scoring.prompt_span_masses` of ``prompt`` with its default
    spans (mean over the answer rows of the attention mass, summed over each part's
    tokens). The gold document's column is starred and boxed in red.
    """

    heads = _heads_of(masses, "masses")
    columns = _part_labels(prompt)
    if masses.shape[1] != len(columns):
        raise DataError(f"masses has {masses.shape[1]} columns, the prompt {len(columns)} parts (sink, instruction, "
                        f"{len(prompt.documents)} documents, question): pass prompt_span_masses with its default spans.")
    z, rows = masses.to_numpy(), [_head_label(layer, head) for layer, head in heads]
    n_rows, n_cols, n_docs = len(rows), len(columns), len(prompt.documents)
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=rows, zmin=0, zmax=max(float(z.max()), 1e-6), colorscale="Viridis", xgap=1, ygap=1,
        colorbar=dict(title=dict(text="attention mass<br>from the<br>answer rows", side="right")),
        texttemplate="%{z:.2f}" if n_rows * n_cols <= 400 else None, textfont=dict(size=9 if n_cols > 12 else 11),
        hovertemplate="%{y} → %{x}<br>mass %{z:.3f}<extra></extra>"))
    for x in (1.5, n_docs + 1.5):  # group separators: sink | instruction | documents | question
        fig.add_shape(type="line", x0=x, x1=x, y0=0, y1=1, xref="x", yref="y domain", line=dict(color="white", width=4))
    if prompt.gold_index is not None:
        g = 2 + prompt.gold_index
        fig.add_shape(type="rect", x0=g - 0.5, x1=g + 0.5, y0=0, y1=1, xref="x", yref="y domain",
                      line=dict(color=_GOLD_OUTLINE, width=3))
    gold = ("no gold document" if prompt.gold_index is None
            else f"red box: the gold document (Doc {prompt.gold_index + 1})")
    fig.update_layout(
        title=dict(
            text=title or "Where the answer rows look: attention mass on each part of the prompt"
            f"<br><sup>colour: attention mass from the answer rows (“{_short(prompt.span_text(prompt.answer), 40)}”, "
            f"mean over {len(prompt.answer)} rows) on each part, summed over its tokens"
            f"<br>{gold}; {n_docs} documents; {n_rows} heads of {_model_name(masses, model_name)}</sup>",
            x=0.01, xanchor="left"),
        xaxis=dict(title="part of the prompt (key span)", type="category", tickvals=columns,
                   ticktext=[f"<b style='color:{_GOLD_OUTLINE}'>{c}</b>" if "gold" in c else c for c in columns],
                   tickangle=-45 if n_cols > 10 else 0, tickfont=dict(size=11 if n_cols <= 30 else 9)),
        yaxis=dict(title="head (layer, head)", type="category", autorange="reversed",
                   tickfont=dict(size=11 if n_rows <= 40 else 8)),
        template="plotly_white", margin=dict(t=130, l=90, r=40, b=110),
        width=max(820, 200 + 46 * n_cols), height=max(460, 260 + (22 if n_rows <= 40 else 14) * n_rows))
    return Figure(fig)


# ------------------------------------------------------------------ 2. token view
@dataclass
class AttentionHTML:
    """A self-contained circuitsvis view (its JavaScript bundle inlined, no network).

    Shows itself in Jupyter; :meth:`save` writes a standalone page.

    Attributes:
        fragment: the HTML fragment (heading, caption, circuitsvis element).
        title: the page title.
        tokens: the window's token texts as shown (not escaped).
        values: ``[n_tokens, n_heads]`` attention mass per token and head.
        labels: one label per head (``L{l}H{h}``).
        window: the prompt's token positions shown.
    """

    fragment: str = field(repr=False)
    title: str
    tokens: list[str] = field(repr=False)
    values: Float[Tensor, "token head"] = field(repr=False)
    labels: list[str]
    window: Span

    def _repr_html_(self) -> str:
        return self.fragment

    def save(self, path: str | Path) -> Path:
        """Write a full HTML page (suffix ``.html``) that opens offline, atomically
        (:func:`~focuslens.io.write_atomic`: the old page or the new one, never half); returns its path."""
        return write_atomic(Path(path).with_suffix(".html"),
                            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
                            f"<title>{html.escape(self.title)}</title></head><body>{self.fragment}</body></html>")


def token_view(masses: pd.DataFrame, prompt: Prompt, tokenizer, *, model_name: str | None = None) -> AttentionHTML:
    """Attention from the answer rows, token by token, for each head (circuitsvis).

    ``masses``: :func:`~focuslens.measure.scoring.token_masses` of ``prompt`` (one row per head, one
    column per token position of a contiguous window). Each token is coloured by the mass
    the answer rows put on it (mean over rows); buttons switch head and hovering a token
    lists every head's value. ``tokenizer`` names tokens without characters (``<bos>``).
    """
    from circuitsvis.tokens import colored_tokens_multi

    heads = _heads_of(masses, "masses")
    positions = _positions(masses, "masses", prompt)
    span = Span(positions[0], positions[-1] + 1)
    if positions != list(span):
        raise DataError("masses: the token positions must be one contiguous window (token_masses gives one).")
    values = torch.from_numpy(masses.to_numpy().T.copy())  # [token, head]
    labels = [_head_label(layer, head) for layer, head in heads]
    tokens = _token_texts(tokenizer, prompt, span)
    rendered = colored_tokens_multi([html.escape(t) for t in tokens], values, labels)
    title = f"Attention from the answer rows, token by token ({_span_names(prompt, span)})"
    gold = "none" if prompt.gold_index is None else f"Doc {prompt.gold_index + 1}"
    caption = (
        f"Tokens {span.start}–{span.end - 1} of {prompt.n_tokens} "
        f"({_span_names(prompt, span)}; gold: {gold}). "
        f"Colour: attention mass from the answer rows “{_short(prompt.span_text(prompt.answer))}” "
        f"(mean over {len(prompt.answer)} rows) on each token, for the head picked with the buttons; "
        f"hover a token for every head's value. Model: {_model_name(masses, model_name)}."
    )
    fragment = (
        "<div style='font-family: sans-serif; max-width: 60em'>"
        f"<h3 style='margin-bottom: 0.3em'>{html.escape(title)}</h3>"
        f"<p style='margin-top: 0; color: #444'>{caption}</p></div>{rendered.local_src}"
    )
    return AttentionHTML(fragment=fragment, title=title, tokens=tokens, values=values, labels=labels, window=span)


# ------------------------------------------------------------------ 3. key bias
def plot_key_bias(bias: pd.DataFrame, prompt: Prompt, tokenizer, *, title: str | None = None,
                  model_name: str | None = None) -> Figure:
    """What a focus direction favours: the logit bias ``b_j = α·d_q·k_j/√d`` each head adds
    to key j, as :meth:`~focuslens.directions.artifact.FocusDirections.key_bias` measures it on
    ``prompt`` (one row per head, one column per key position; ``attrs["alpha"]``).

    Top: heads × token positions from the first document to the end of the question
    (diverging colours, 0 = white), documents separated by lines and labelled above, the
    gold document boxed. Bottom: the bias averaged over each document's tokens (and the
    sink's and question's), mean over the heads ± s.d. across heads, gold bar highlighted.
    """

    heads = _heads_of(bias, "bias")
    if _positions(bias, "bias", prompt) != list(range(prompt.n_tokens)):
        raise DataError("bias must have one column per token of the prompt (FocusDirections.key_bias gives that).")
    values = torch.tensor(bias.to_numpy(), dtype=torch.float32)  # [head, key]
    first, last = prompt.documents[0].start, prompt.question.end
    n_rows, n_cols = len(heads), last - first
    width = int(min(max(900, 260 + 2.2 * n_cols), 2200))
    heat_h, bar_h, gap = max(150, 24 * n_rows), 260, 140  # pixels; the gap holds an axis title and a subtitle
    plot_h = heat_h + bar_h + gap
    fig = make_subplots(rows=2, cols=1, row_heights=[heat_h, bar_h], vertical_spacing=gap / plot_h,
                        subplot_titles=("", f"Mean bias per part (over its tokens; mean ± s.d. over the {n_rows} heads)"))
    _add_bias_heatmap(fig, values[:, first:last], heads, first, _token_texts(tokenizer, prompt, Span(first, last)))
    _mark_documents(fig, prompt, width, n_cols)
    _add_part_bars(fig, prompt, values)
    gold = "" if prompt.gold_index is None else f"; black box and ★: the gold document (Doc {prompt.gold_index + 1})"
    alpha = bias.attrs.get("alpha")
    fig.update_layout(
        title=dict(
            text=title or "Logit bias a focus direction adds to each key (α·d_q·k_j/√d)"
            + (f", α = {alpha:g}" if alpha is not None else "")
            + "<br><sup>colour: bias added to the head's attention logit for key j (red: attended more, blue: less; "
            f"the weight scales by e<sup>b</sup>)<br>{n_rows} heads of {_model_name(bias, model_name)}{gold}"
            "<br>band above the heatmap: the documents, numbered as in the prompt, then the question</sup>",
            x=0.01, xanchor="left"),
        template="plotly_white", margin=dict(t=190, l=90, r=40, b=130), width=width, height=190 + plot_h + 130)
    return Figure(fig)


def _add_bias_heatmap(
    fig, shown: Tensor, heads: list[tuple[int, int]], first: int, tokens: list[str]
) -> None:
    """Row 1: heads × key positions ``first …``, diverging colours centred at 0."""

    heat_bottom, heat_top = fig.layout.yaxis.domain
    limit = max(float(shown.abs().max()), 1e-6)
    hover_tokens = [html.escape(t.replace("\n", "↵")) for t in tokens]
    fig.add_trace(
        go.Heatmap(
            z=shown.numpy(),
            x=list(range(first, first + shown.shape[1])),
            y=[_head_label(layer, head) for layer, head in heads],
            customdata=[hover_tokens] * len(heads),
            colorscale="RdBu_r",
            zmid=0,
            zmin=-limit,
            zmax=limit,
            colorbar=dict(
                title=dict(text="logit bias b_j<br>(added to the<br>attention logit)", side="right"),
                len=heat_top - heat_bottom,
                y=heat_top,
                yanchor="top",
            ),
            hovertemplate="%{y}, key %{x} “%{customdata}”<br>bias %{z:+.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.update_xaxes(title_text="key position (token index in the prompt)", showgrid=False, row=1, col=1)
    fig.update_yaxes(
        title_text="head",
        type="category",
        autorange="reversed",
        tickfont=dict(size=11 if len(heads) <= 40 else 8),
        row=1,
        col=1,
    )


def _add_part_bars(fig, prompt: Prompt, bias: Tensor) -> None:
    """Row 2: mean bias over each part's tokens (sink, every document, question), mean ±
    s.d. over the heads; the gold document's bar in gold with a red outline."""

    n_docs = len(prompt.documents)
    table = bias_by_part(pd.DataFrame(bias.numpy()), prompt)  # [head, part]
    parts = ["sink", *(_doc_label(prompt, i) for i in range(n_docs)), "question"]
    per_part = torch.tensor(table.to_numpy())
    colours = [
        "#7f7f7f",
        *(_GOLD_FILL if i == prompt.gold_index else "#6baed6" for i in range(n_docs)),
        "#bdbdbd",
    ]
    outline = [_GOLD_OUTLINE if c == _GOLD_FILL else "rgba(0,0,0,0)" for c in colours]
    fig.add_trace(
        go.Bar(
            x=parts,
            y=per_part.mean(0).numpy(),
            error_y=dict(
                type="data", array=per_part.std(0, unbiased=False).numpy(), thickness=1, color="#444"
            ),
            marker=dict(color=colours, line=dict(color=outline, width=2)),
            hovertemplate="%{x}<br>mean bias %{y:+.3f}<extra></extra>",
            showlegend=False,
        ),
        row=2,
        col=1,
    )
    fig.update_xaxes(
        type="category",
        tickangle=-45 if n_docs > 8 else 0,
        tickvals=parts,
        ticktext=[f"<b style='color:{_GOLD_OUTLINE}'>{c}</b>" if "gold" in c else c for c in parts],
        tickfont=dict(size=11 if n_docs <= 30 else 9),
        row=2,
        col=1,
    )
    fig.update_yaxes(title_text="mean logit bias", zeroline=True, zerolinecolor="#444", row=2, col=1)


def _mark_documents(fig, prompt: Prompt, width: int, n_cols: int) -> None:
    """Document boundaries on the key-bias heatmap (row 1): a labelled band of alternating
    shades above it, thin lines through it, and a box around the gold document."""
    docs = prompt.documents
    px_per_token = (width - 260) / max(n_cols, 1)
    short = min(len(d) for d in docs) * px_per_token < 48
    bands = [(d, _doc_label(prompt, i, short=short), i == prompt.gold_index) for i, d in enumerate(docs)]
    bands.append((prompt.question, "Q" if len(prompt.question) * px_per_token < 60 else "question", False))
    for n, (span, label, is_gold) in enumerate(bands):
        fill = _GOLD_FILL if is_gold else ("#d9d9d9" if n % 2 else "#f0f0f0")
        # a band of fixed height (pixels) just above the heatmap, whatever its size
        fig.add_shape(
            type="rect",
            x0=span.start - 0.5,
            x1=span.end - 0.5,
            xref="x",
            yref="y domain",
            ysizemode="pixel",
            yanchor=1,
            y0=2,
            y1=22,
            fillcolor=fill,
            line=dict(width=0),
        )
        fig.add_annotation(
            x=(span.start + span.end - 1) / 2,
            y=1,
            xref="x",
            yref="y domain",
            yanchor="bottom",
            yshift=4,
            text=label,
            showarrow=False,
            font=dict(size=10 if short else 11, color="black"),
        )
        fig.add_shape(
            type="line",
            x0=span.start - 0.5,
            x1=span.start - 0.5,
            y0=0,
            y1=1,
            xref="x",
            yref="y domain",
            line=dict(color="rgba(0,0,0,0.45)", width=1),
        )
    if prompt.gold is not None:
        fig.add_shape(
            type="rect",
            x0=prompt.gold.start - 0.5,
            x1=prompt.gold.end - 0.5,
            y0=0,
            y1=1,
            xref="x",
            yref="y domain",
            line=dict(color="black", width=2.5),
        )
