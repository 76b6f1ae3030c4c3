"""The second embedded family, Gemma 3 270M (base model): its architecture differs from
SmolLM2's where focuslens could go wrong (one KV head, head size 256, QK-norm, one RoPE
table per layer type, 15 of 18 layers with a 512-token sliding window, a 262k vocabulary).
One prompt of 40 documents (past the window) through every path that the tiny Gemma-style
configs of the architecture sweep exercise at small size."""

from __future__ import annotations

import torch
from test_rows import _check_focus_sweep, _check_split_sweep, _directions

import focuslens as fl
from focuslens.model.attention import eager_attention, path_of


def _examples(n=1, docs=40):
    return fl.make_synthetic_qa(n, n_documents=docs, seed=5)


def test_gemma3_loads_as_the_embedded_base_model(gemma3):
    c = gemma3.cfg
    assert (c.n_layers, c.n_heads, c.n_key_value_heads, c.d_head) == (18, 4, 1, 256)
    assert set(path_of(gemma3).values()) == {"pattern-free"}
    types = gemma3.original_model.config.layer_types
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [5, 11, 17]
    assert gemma3.tokenizer.chat_template is None  # a base model: prompts render as plain continuation


@torch.no_grad()
def test_gemma3_past_its_sliding_window_pattern_free_equals_eager_and_caches_keep_every_position(gemma3):
    prompt = fl.render(_examples()[0], gemma3.tokenizer)
    assert prompt.n_tokens > 600  # the 512-token window bites
    ids = prompt.input_ids[None]
    fast = gemma3(ids)[0, -1]
    with eager_attention(gemma3):
        eager = gemma3(ids)[0, -1]
    assert (fast - eager).abs().max() < 1e-3 * eager.abs().max()
    _, cache = gemma3(ids[:, :-1], return_type="logits_and_cache")
    assert {layer.keys.shape[-2] for layer in cache.layers} == {prompt.n_tokens - 1}
    step = gemma3(ids[:, -1:], past_key_values=cache)[0, -1]
    assert (step - fast).abs().max() < 1e-3 * fast.abs().max()


@torch.no_grad()
def test_gemma3_sweep_cells_equal_the_context_managers(gemma3):
    examples = _examples()
    ranking = [(5, 1), (11, 2), (0, 1), (17, 0)]
    dirs = _directions(gemma3, 0.5, ranking)
    for rows in ("answer", "all"):
        _check_focus_sweep(gemma3, dirs, examples, (2,), (4.0,), rows, atol=2e-3)
    _check_split_sweep(gemma3, ranking, examples, (2,), (0.1,), "answer", atol=2e-3)
