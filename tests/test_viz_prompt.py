"""Prompt-level figures: document × head map, circuitsvis token view, key-bias view.

Numbers are checked against a slow reference (full attention patterns from
``run_with_cache``); saved HTML is checked to load nothing from the network.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import get_tiny
from plotly.offline import get_plotlyjs_version

import focuslens
from focuslens import DataError, ModelError, Span, make_synthetic_qa, render
from focuslens.directions.artifact import FocusDirections
from focuslens.measure.scoring import prompt_span_masses, token_masses
from focuslens.viz import AttentionHTML, plot_document_attention, plot_key_bias, token_view

PLOTLY_JS = f"plotly.js v{get_plotlyjs_version()}"  # the banner of the inlined bundle

N_DOCS = 6
# a resource fetched from elsewhere: <script src=//…>, <link href=http…>, CSS @import
REMOTE_SRC = re.compile(r"""src=["']?(https?:)?//""")
REMOTE_HREF = re.compile(r"""href=["']?(https?:)?//""")
REMOTE_LINK = re.compile(r"""<link[^>]*href=["']?(https?:)?//""", re.IGNORECASE)
CSS_IMPORT = re.compile(r"@import url\(")
SCRIPT_BODY = re.compile(r"<script[^>]*>.*?</script>", re.DOTALL | re.IGNORECASE)


def assert_offline(text: str) -> None:
    """No remote script, stylesheet, font or import. Inlined JS bundles (plotly.js) carry
    plain hyperlinks (``<a href=https://plotly.com>``) in strings, which load nothing, so
    the ``href=`` check runs on the page's markup outside the script bodies."""
    assert not REMOTE_SRC.search(text)
    assert not REMOTE_LINK.search(text)
    assert not CSS_IMPORT.search(text)
    assert not REMOTE_HREF.search(SCRIPT_BODY.sub("", text))


def prompt_for(model):
    return render(make_synthetic_qa(1, n_documents=N_DOCS, seed=0)[0], model.tokenizer)


def reference_rows(model, prompt) -> torch.Tensor:
    """[layer, head, key]: the answer rows' attention, mean over rows, from full patterns."""
    _, cache = model.run_with_cache(prompt.input_ids[None], names_filter=lambda n: n.endswith("hook_pattern"))
    rows = prompt.answer.to_slice()
    return torch.stack(
        [
            cache[f"blocks.{layer}.attn.hook_pattern"][0, :, rows, :].float().mean(1)
            for layer in range(model.cfg.n_layers)
        ]
    )


def directions_for(model, seed: int = 0) -> FocusDirections:
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    ranking = [(layer, head) for layer in reversed(range(c.n_layers)) for head in range(c.n_heads)]
    return FocusDirections(
        torch.randn(c.n_layers, c.n_heads, c.d_head, generator=g),
        torch.zeros(c.n_layers, c.n_heads, c.d_head),
        ranking,
        {"model": focuslens.model.load.model_id(model)},
    )


# ------------------------------------------------------------------ prompt_span_masses
@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 1)])
def test_span_masses_match_full_patterns(arch, kv):
    model = get_tiny(arch, kv)
    prompt = prompt_for(model)
    masses = prompt_span_masses(model, prompt)
    ref = reference_rows(model, prompt)  # [layer, head, key]
    spans = {
        "sink": prompt.sink,
        "instruction": prompt.instruction,
        **{f"doc_{i + 1}": d for i, d in enumerate(prompt.documents)},
        "question": prompt.question,
    }
    assert list(masses.columns) == list(spans)
    assert len(masses) == model.cfg.n_layers * model.cfg.n_heads
    expected = torch.stack([ref[..., s.to_slice()].sum(-1) for s in spans.values()], dim=-1).flatten(0, 1)
    torch.testing.assert_close(torch.tensor(masses.to_numpy()), expected, atol=1e-5, rtol=0)
    # the parts are disjoint: together at most all of each row's mass
    assert (masses.sum(axis=1) <= 1 + 1e-5).all()
    assert (masses.to_numpy() >= 0).all()


def test_span_masses_head_selection_keeps_order():
    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    full = prompt_span_masses(model, prompt)
    picked = prompt_span_masses(model, prompt, [(1, 3), (0, 2), (1, 3)])
    assert list(picked.index) == [(1, 3), (0, 2)]
    torch.testing.assert_close(
        torch.tensor(picked.to_numpy()), torch.tensor(full.loc[[(1, 3), (0, 2)]].to_numpy())
    )
    assert list(prompt_span_masses(model, prompt, layer=1).index) == [(1, h) for h in range(model.cfg.n_heads)]


@pytest.mark.parametrize(
    "kwargs,error,field",
    [
        ({"heads": [(2, 0)]}, ModelError, "head (2, 0) is outside"),
        ({"heads": [(0, 4)]}, ModelError, "head (0, 4) is outside"),
        ({"layer": 5}, ModelError, "layer=5"),
        ({"heads": 5}, DataError, "heads=5: an int is the top k of a ranking"),
        ({"heads": 3, "ranking": [(0, 1)]}, DataError, "heads=3: the ranking has 1 heads"),
        ({"heads": [("0", 1)]}, DataError, "is not a (layer, head) pair"),
        ({"heads": []}, DataError, "heads is empty"),
        ({"heads": [(0, 1)], "layer": 1}, DataError, "not both"),
    ],
)
def test_bad_head_selections_name_the_mistake(kwargs, error, field):
    model = get_tiny("llama", 2)
    with pytest.raises(error, match=re.escape(field)):
        prompt_span_masses(model, prompt_for(model), **kwargs)


def test_an_int_is_the_top_k_of_the_ranking_not_a_layer():
    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    ranking = [(1, 2), (0, 3), (1, 0)]
    assert list(prompt_span_masses(model, prompt, 2, ranking=ranking).index) == ranking[:2]


# ------------------------------------------------------------------ document map
def test_document_map_figure(tmp_path):
    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    masses = prompt_span_masses(model, prompt, [(0, 1), (1, 2), (1, 0)])
    fig = plot_document_attention(masses, prompt)
    heat = fig.data[0]
    columns = list(heat.x)
    assert len(columns) == N_DOCS + 3
    assert columns[0] == "sink" and columns[1] == "instruction" and columns[-1] == "question"
    gold = columns[2 + prompt.gold_index]
    assert "gold" in gold and f"Doc {prompt.gold_index + 1}" in gold
    assert sum("gold" in c for c in columns) == 1
    assert list(heat.y) == ["L0H1", "L1H2", "L1H0"]
    # the gold column is outlined
    g = 2 + prompt.gold_index
    assert any(s.type == "rect" and s.x0 == g - 0.5 and s.x1 == g + 0.5 for s in fig.layout.shapes)
    torch.testing.assert_close(torch.tensor(heat.z), torch.tensor(masses.to_numpy()))
    assert "answer rows" in fig.layout.title.text and masses.attrs["model"] in fig.layout.title.text

    (path,) = fig.save(tmp_path / "x", formats=("html",))
    text = path.read_text()
    assert path.suffix == ".html" and "plotly" in text and PLOTLY_JS in text  # plotly.js inlined
    assert_offline(text)


def test_document_map_scales_with_counts():
    model = get_tiny("llama", 2)
    prompt = render(make_synthetic_qa(1, n_documents=24, seed=1)[0], model.tokenizer)
    fig = plot_document_attention(prompt_span_masses(model, prompt), prompt)
    assert len(fig.data[0].x) == 27
    assert fig.layout.width >= 27 * 40  # ≥ 40 px per column
    assert fig.layout.xaxis.tickangle == -45


# ------------------------------------------------------------------ token view
def test_token_view_values_and_offline_html(tmp_path):
    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    heads = [(1, 0), (0, 3)]
    view = token_view(token_masses(model, prompt, heads, window=(0, 12)), prompt, model.tokenizer)
    assert isinstance(view, AttentionHTML)
    assert view.window == Span(0, 12)
    assert view.labels == ["L1H0", "L0H3"]
    assert view.tokens[0] == "<bos>" and view.values.shape == (12, 2)
    ref = reference_rows(model, prompt)
    expected = torch.stack([ref[layer, head, :12] for layer, head in heads], dim=1)
    torch.testing.assert_close(view.values, expected, atol=1e-5, rtol=0)

    path = view.save(tmp_path / "tokens")
    text = path.read_text(encoding="utf-8")
    assert path.name == "tokens.html"
    assert text.startswith("<!DOCTYPE html>") and "<meta charset='utf-8'>" in text and "<title>" in text
    assert len(text) > 500_000 and "CircuitsVis" in text  # the bundle is inlined
    assert "unpkg.com" not in text
    assert "&lt;bos&gt;" in text and '"<bos>"' not in text
    assert_offline(text)
    assert view._repr_html_() in text


def test_token_view_default_window_sums_to_document_mass():
    model = get_tiny("qwen2", 2)
    prompt = prompt_for(model)
    g, docs = prompt.gold_index, prompt.documents
    view = token_view(token_masses(model, prompt, layer=1), prompt, model.tokenizer)
    assert view.window == Span(docs[g - 1].start, docs[g + 1].end)
    masses = prompt_span_masses(model, prompt, layer=1)
    # the window's tokens summed over each document give the document masses
    for i in (g - 1, g, g + 1):
        d = docs[i]
        per_doc = view.values[d.start - view.window.start : d.end - view.window.start].sum(0)
        torch.testing.assert_close(
            per_doc, torch.tensor(masses[f"doc_{i + 1}"].to_numpy()), atol=1e-5, rtol=0
        )
    # the token texts rebuild the prompt's characters
    assert "".join(view.tokens).startswith(prompt.span_text(docs[g - 1]))


@pytest.mark.parametrize("window", [(0, 10_000), (-1, 5), (8, 8), "doc_99", 3.5])
def test_token_view_bad_window(window):
    model = get_tiny("llama", 2)
    with pytest.raises(DataError, match="window"):
        token_masses(model, prompt_for(model), [(0, 0)], window=window)


# ------------------------------------------------------------------ key bias
def test_key_bias_figure():
    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    dirs = directions_for(model)
    table = dirs.key_bias(model, prompt, 0.5, 3)
    fig = plot_key_bias(table, prompt, model.tokenizer)
    heat, bars = fig.data
    first, last = prompt.documents[0].start, prompt.question.end
    assert len(heat.x) == last - first and heat.x[0] == first
    assert list(heat.y) == ["L1H0", "L1H1", "L1H2"]
    bias = torch.tensor(table.to_numpy())
    torch.testing.assert_close(torch.tensor(heat.z, dtype=torch.float32), bias[:, first:last])
    assert heat.zmid == 0
    # one bar per document, plus the sink and the question; the gold bar stands out
    assert len(bars.x) == N_DOCS + 2 and bars.x[0] == "sink" and bars.x[-1] == "question"
    gold = 1 + prompt.gold_index
    assert "gold" in bars.x[gold]
    assert len({bars.marker.color[i] for i in range(1, N_DOCS + 1)}) == 2
    assert bars.marker.color.count(bars.marker.color[gold]) == 1
    means = [bias[:, s.to_slice()].mean() for s in (prompt.sink, *prompt.documents, prompt.question)]
    torch.testing.assert_close(torch.tensor(bars.y, dtype=torch.float32), torch.stack(means))
    labels = [a.text for a in fig.layout.annotations]
    assert all(any(f"{i + 1}" in t for t in labels) for i in range(N_DOCS))
    assert "α·d_q·k_j/√d" in fig.layout.title.text and "α = 0.5" in fig.layout.title.text


def test_bias_by_part_averages_each_parts_keys_by_name():
    from focuslens.directions.artifact import bias_by_part

    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    table = directions_for(model).key_bias(model, prompt, 0.5, 3)
    parts = bias_by_part(table, prompt)
    assert list(parts.columns) == ["sink", *(f"doc_{i + 1}" for i in range(N_DOCS)), "question"]
    assert list(parts.index) == list(table.index) and parts.attrs["gold"] == f"doc_{prompt.gold_index + 1}"
    assert parts.attrs["alpha"] == 0.5
    values = table.to_numpy()
    for name, span in (("sink", prompt.sink), ("doc_2", prompt.documents[1]), ("question", prompt.question)):
        np.testing.assert_allclose(parts[name], values[:, span.start : span.end].mean(1), rtol=1e-6)
    read_back = table.copy()
    read_back.columns = [str(c) for c in read_back.columns]  # as a CSV gives it back
    pd.testing.assert_frame_equal(bias_by_part(read_back, prompt), parts)
    with pytest.raises(DataError, match="key columns"):
        bias_by_part(table.iloc[:, :-1], prompt)


def test_key_bias_explicit_heads_and_errors():
    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    dirs = directions_for(model)
    fig = plot_key_bias(dirs.key_bias(model, prompt, heads=[(0, 2), (1, 1)]), prompt, model.tokenizer)
    assert list(fig.data[0].y) == ["L0H2", "L1H1"]
    with pytest.raises(DataError, match="the ranking has 8 heads"):  # k beyond the ranking: an error, not capped
        dirs.key_bias(model, prompt, heads=100)
    with pytest.raises(ModelError, match="head"):
        dirs.key_bias(model, prompt, heads=[(0, 9)])


def test_figures_refuse_a_measurement_of_another_prompt():
    model = get_tiny("llama", 2)
    prompt = prompt_for(model)
    short = render(make_synthetic_qa(1, n_documents=2, seed=0)[0], model.tokenizer)
    with pytest.raises(DataError, match="was it measured on another prompt"):
        token_view(token_masses(model, prompt, [(0, 0)], window=(prompt.n_tokens - 3, prompt.n_tokens)), short,
                   model.tokenizer)
    with pytest.raises(DataError, match="one column per token of the prompt"):
        plot_key_bias(directions_for(model).key_bias(model, short, heads=2), prompt, model.tokenizer)
    with pytest.raises(DataError, match="columns, the prompt"):
        plot_document_attention(prompt_span_masses(model, prompt), short)
    with pytest.raises(DataError, match=r"indexed by \(layer, head\)"):
        plot_document_attention(prompt_span_masses(model, prompt).reset_index(), prompt)
