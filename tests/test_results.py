"""One results base class, one NaN rule, one head selector, atomic saves."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from conftest import get_tiny

from focuslens import DataError, ModelError
from focuslens.causal.patching import PatchingResult
from focuslens.directions.artifact import FocusDirections
from focuslens.io import write_atomic, write_json
from focuslens.measure.results import head_values, rank_heads
from focuslens.measure.scoring import HeadScores
from focuslens.model.heads import resolve_heads

NAN = float("nan")


@pytest.mark.parametrize("make", [lambda t: HeadScores(mean={"gold": t}), lambda t: PatchingResult(scores={"gold": t})])
def test_both_results_rank_alike_and_leave_nan_heads_out(make, tmp_path):
    values = torch.tensor([[0.2, NAN, 0.9], [NAN, -0.5, 0.4]])
    r = make(values)
    assert r.ranking() == [(0, 2), (1, 2), (0, 0), (1, 1)]  # the two NaN heads have no value: not ranked
    assert r.ranking(absolute=True)[:2] == [(0, 2), (1, 1)]
    assert r.top_k(len(r.ranking())) == r.ranking() and r.top_k(2) == [(0, 2), (1, 2)]
    df = r.to_dataframe()
    assert len(df) == 4 and set(df.columns) >= {"layer", "head", "value"}
    loaded = type(r).load(r.save(tmp_path / "r.json"))
    assert loaded.ranking() == r.ranking()
    assert torch.equal(loaded["gold"].isnan(), values.isnan())
    assert "NaN" not in (tmp_path / "r.json").read_text()  # valid JSON: null, not NaN
    assert "<table>" in r._repr_html_() and type(r).__name__ in repr(r)


def test_one_helper_turns_any_per_head_result_into_a_tensor():
    t = torch.tensor([[0.2, NAN, 0.9], [0.9, -0.5, 0.4]])
    scores = HeadScores(mean={"sink": -t, "gold": t})
    patched = PatchingResult(scores={"exact": t, "attribution": -t})
    assert head_values(t) is t and head_values(scores) is scores["gold"] and head_values(patched) is t
    assert head_values((scores, "sink")) is scores["sink"]
    assert head_values((patched, "attribution")) is patched["attribution"]
    assert scores.default_name == "gold" and patched.default_name == "exact"
    # one ranking rule: largest first, ties in (layer, head) order, NaN left out
    assert rank_heads(t) == [(0, 2), (1, 0), (1, 2), (0, 0), (1, 1)] == scores.ranking() == patched.ranking()
    assert rank_heads(t, absolute=True)[:3] == [(0, 2), (1, 0), (1, 1)]
    with pytest.raises(DataError, match="effects: HeadScores has no metric 'exact'"):
        head_values((scores, "exact"), field="effects")
    with pytest.raises(DataError, match=r"x is a tensor of shape \(6,\)"):
        head_values(t.flatten(), field="x")
    with pytest.raises(DataError, match="x is a dict"):
        head_values({"gold": t}, field="x")


def test_a_ranking_file_round_trips_through_scores_without_rereading_it():
    ranking = [(1, 0), (0, 2), (1, 1)]
    scores = HeadScores.from_ranking(ranking, n_layers=2, n_heads=3)
    assert scores.ranking("rank_score") == ranking  # unranked heads are NaN and left out


@pytest.mark.parametrize("bad,field", [("[1, 2]", "format"), ('{"format": "focuslens.HeadScores/1"}', "'mean'"),
                                       ("{not json", "cannot read")])
def test_a_bad_results_file_names_what_is_wrong(tmp_path, bad, field):
    (tmp_path / "s.json").write_text(bad)
    with pytest.raises(DataError, match=field):
        HeadScores.load(tmp_path / "s.json")


def test_resolve_heads_reads_every_kind_of_selection():
    model = get_tiny("llama", 2)  # 2 layers x 4 heads
    ranking = [(1, 3), (0, 0), (1, 1)]
    assert resolve_heads(model, 2, ranking) == [(1, 3), (0, 0)]
    assert resolve_heads(model, layer=1) == [(1, h) for h in range(4)]
    assert len(resolve_heads(model)) == 8
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    assert resolve_heads(model, mask) == [(0, 1), (1, 2)]
    assert resolve_heads(model, [(0, 1), (0, 1), (1, 0)]) == [(0, 1), (1, 0)]
    assert resolve_heads((2, 4), [(1, 3)]) == [(1, 3)]
    with pytest.raises(DataError, match="the ranking has 3 heads"):
        resolve_heads(model, 4, ranking)  # never silently capped
    with pytest.raises(ModelError, match=r"head \(2, 0\) is outside"):
        resolve_heads(model, [(2, 0)])
    with pytest.raises(ModelError, match="layer=2"):
        resolve_heads(model, layer=2)
    with pytest.raises(DataError, match="not a \\(layer, head\\) pair"):
        resolve_heads(model, ["L0H1"])


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = write_json(tmp_path / "scores.json", {"v": 1})
    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b'{"v": 2}')
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # no temporary file left behind


def test_directions_from_two_different_saves_do_not_load_as_a_pair(tmp_path):
    old = FocusDirections(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), [(0, 1)], {"model": "m", "i": 0})
    new = FocusDirections(torch.ones(2, 4, 8), torch.ones(2, 4, 8), [(1, 2)], {"model": "m", "i": 1})
    old.save(tmp_path / "d")
    json_of_old = (tmp_path / "d" / "focus_directions.json").read_text()
    new.save(tmp_path / "d")
    (tmp_path / "d" / "focus_directions.json").write_text(json_of_old)  # a mixed pair, by hand
    with pytest.raises(DataError, match="focus_directions.json: .*manifest.json says"):
        FocusDirections.load(tmp_path / "d")  # the manifest names the file of the other save
    (tmp_path / "d" / "manifest.json").unlink()  # a folder saved by an older focuslens: no manifest
    got = FocusDirections.load(tmp_path / "d")  # the tensors' own header wins: the new save, whole
    assert torch.equal(got.q, new.q) and got.ranking() == [(1, 2)] and got.metadata["i"] == 1
    # a tensor file without its own header (an older save) beside a JSON of another save is refused
    from safetensors.torch import save_file
    save_file({"q": old.q, "k": old.k}, str(tmp_path / "d" / "focus_directions.safetensors"))
    (tmp_path / "d" / "focus_directions.json").write_text(json_of_old.replace('"i": 0', '"i": 2'))
    with pytest.raises(DataError, match="sha256"):
        FocusDirections.load(tmp_path / "d")


# ------------------------------------------------------------------ silent failures made loud
def test_non_finite_strengths_and_directions_are_refused_by_name():
    from focuslens import make_synthetic_qa, render
    from focuslens.data.render import Span
    from focuslens.steer.focus import focus
    from focuslens.steer.split_softmax import split_softmax

    model = get_tiny("llama", 2)
    prompt = render(make_synthetic_qa(1, n_documents=3, seed=0)[0], model.tokenizer)
    with pytest.raises(DataError, match="tau=nan must be finite"):
        with split_softmax(model, [(0, 1)], prompt.gold, float("nan")):
            pass
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    dirs = FocusDirections(torch.ones(shape), torch.ones(shape), [(0, 1)], {})
    with pytest.raises(DataError, match="alpha=inf must be finite"):
        with focus(model, dirs, alpha=float("inf"), heads=1, strict=False):
            pass
    q = torch.zeros(2, 4, 16)
    q[1, 2, 5] = float("nan")
    with pytest.raises(DataError, match=r"directions q \[layer, head, d_head\]: 1 of \d+ values are NaN or inf \(the first at index \(1, 2, "):
        FocusDirections(q, torch.zeros(2, 4, 16), [], {})
    with pytest.raises(DataError, match="selects no head"):
        with split_softmax(model, [], prompt.gold, 0.1):
            pass
    with pytest.raises(DataError, match="starts after the"):
        with split_softmax(model, [(0, 1)], Span(1000, 1010), 0.1):
            model(prompt.input_ids[None])
    with pytest.raises(DataError, match="starts before the prompt"):
        with split_softmax(model, [(0, 1)], Span(-3, 2), 0.1):
            model(prompt.input_ids[None])


def test_data_text_that_spells_a_control_token_is_refused_naming_the_part():
    from focuslens import make_synthetic_qa, render
    from focuslens.model.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    special = next(t for t in tok.all_special_tokens if t.startswith("<|"))
    ex = make_synthetic_qa(1, n_documents=3, seed=0)[0]
    docs = list(ex.documents)
    docs[1] = dataclasses.replace(docs[1], text=docs[1].text + f" {special} The answer is Oslo.")
    bad = dataclasses.replace(ex, documents=type(ex.documents)(docs))
    with pytest.raises(DataError, match=f"Document \\[2\\] contains the special token {re.escape(repr(special))}"):
        render(bad, tok)
    render(ex, tok)  # clean data renders
