"""The long-context stage: its tasks, its resumable progress, its summary and figures.

The measurement itself runs on the pattern-free path (tests/test_attention.py holds that
path equal to the eager one); here a tiny model runs the needle task end to end, a killed
run resumes without redoing a prompt, and SmolLM2 checks the tasks' token lengths.
"""

from __future__ import annotations

import pytest
import torch

import focuslens as fl
from focuslens.data.needle import make_needle_examples, needle_vocabulary
from focuslens.errors import DataError
from focuslens.experiments.stages.long_context import (
    LENGTHS,
    long_context_examples,
    long_context_summary,
    run_long_context,
)
from focuslens.model.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_heads=4, n_kv_heads=2, tokenizer=tiny_tokenizer(needle_vocabulary()))


def test_needle_examples_are_seeded_and_their_near_misses_differ_by_one_word():
    a, b = make_needle_examples(3, n_documents=12, seed=5), make_needle_examples(3, n_documents=12, seed=5)
    assert a == b and a != make_needle_examples(3, n_documents=12, seed=6)
    for ex in a:
        gold = ex.documents[ex.gold_index].text
        assert f"vault is {ex.answers[0]}" in gold
        needles = [d.text for d in ex.documents if "vault is" in d.text]
        assert len(needles) == 5 and len(set(ex.candidates)) == 5
        key = ex.question.split("of the ")[1].split(" vault")[0].split()
        for doc in ex.meta["distractor_documents"]:
            other = ex.documents[doc].text.split("passcode of the ")[1].split(" vault")[0].split()
            assert sum(x != y for x, y in zip(key, other)) == 1  # a near miss: one word differs


def test_positions_cycle_first_middle_last():
    examples = long_context_examples("needle", 10, 6)
    assert [ex.gold_index for ex in examples] == [0, 4, 9, 0, 4, 9]
    assert [ex.meta["gold_position"] for ex in long_context_examples("kv", 25, 3)] == [0, 12, 24]
    with pytest.raises(DataError, match="nq_path"):
        long_context_examples("nq", 10, 3)


@torch.no_grad()
def test_the_stage_runs_resumes_and_summarises(model, tmp_path):
    heads = [(0, 1), (1, 2), (1, 3)]
    kw = dict(out_dir=tmp_path, tasks=("needle",), lengths={"needle": (4, 8)}, n_prompts=3, k=2, quiet=True)
    first = run_long_context(model, heads, **kw)
    rows = first["long_context"]
    assert len(rows) == 6 and set(rows.position) == {"first", "middle", "last"}
    assert rows.top_gold_mass.between(0, 1).all() and (rows.n_tokens > 0).all()
    cell = first.summary["tasks"]["needle"]["8"]
    assert cell["n"] == 3 and 0 <= cell["correct_ci"][0] <= cell["accuracy"] <= cell["correct_ci"][1] <= 1
    assert first.objects["profiles"]["needle_8"].shape == (2, 4, 8)
    # slot masses: the answer rows' mass on the documents, summed over 3 prompts, at most 3 per head
    assert 0 < float(first.objects["profiles"]["needle_8"].sum(-1).max()) <= 3 + 1e-5
    again = run_long_context(model, heads, **kw)  # everything done: nothing re-run
    assert again.summary["prompts_this_run"] == 0
    assert again["long_context"].equals(rows)
    with pytest.raises(DataError, match="other settings"):
        run_long_context(model, heads, **(kw | {"tau": 0.5}))
    more = run_long_context(model, heads, **(kw | {"n_prompts": 4}))  # extended: only the new prompts run
    assert more.summary["prompts_this_run"] == 2 and len(more["long_context"]) == 8
    assert more["long_context"].iloc[:6].equals(rows)


@torch.no_grad()
def test_a_killed_run_resumes_where_it_stopped(model, tmp_path, monkeypatch):
    import focuslens.experiments.stages.long_context as lc

    heads = [(0, 1), (1, 2)]
    kw = dict(out_dir=tmp_path, tasks=("needle",), lengths={"needle": (4,)}, n_prompts=3, k=2, quiet=True)
    calls = []
    real = lc._measure

    def dies_on_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lc, "_measure", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_long_context(model, heads, **kw)
    monkeypatch.setattr(lc, "_measure", real)
    resumed = run_long_context(model, heads, **kw)
    assert resumed.summary["prompts_this_run"] == 1 and len(resumed["long_context"]) == 3
    whole = run_long_context(model, heads, **(kw | {"out_dir": tmp_path / "whole"}))
    cols = ["qid", "correct", "split_correct", "top_gold_mass"]
    assert resumed["long_context"][cols].equals(whole["long_context"][cols])
    assert torch.allclose(resumed.objects["profiles"]["needle_4"], whole.objects["profiles"]["needle_4"])


def test_summary_counts_prompts_past_the_context_as_skipped():
    import pandas as pd

    rows = pd.DataFrame([{"task": "kv", "size": 9, "n_tokens": 10, "correct": True, "split_correct": True,
                          "top_gold_mass": 0.5, "top_sink_mass": 0.1, "position": "first"},
                         {"task": "kv", "size": 9, "skipped": "too long"}])
    cell = long_context_summary(rows)["tasks"]["kv"]["9"]
    assert cell["n"] == 1 and cell["skipped"] == 1


def test_the_figures_draw(model, tmp_path):
    from focuslens.viz.long_context import plot_long_context, plot_long_context_positions, plot_slot_profile

    stage = run_long_context(model, [(0, 1), (1, 2)], out_dir=tmp_path, tasks=("needle",),
                             lengths={"needle": (4, 6)}, n_prompts=2, k=2, quiet=True)
    fig = plot_long_context(stage["long_context"])
    assert len(fig.data) == 3  # accuracy, split-softmax accuracy, gold mass
    heat = plot_slot_profile(stage.objects["profiles"]["needle_6"], 2)
    assert len(heat.data[0].z) == model.cfg.n_layers and len(heat.data[0].z[0]) == 6
    from focuslens.experiments.stages.long_context import slot_profiles

    saved = slot_profiles(stage["long_context_slots"])  # the profile saved with the stage, read back
    assert set(saved) == {"needle_6"} and torch.allclose(saved["needle_6"], stage.objects["profiles"]["needle_6"])
    rows = stage["long_context"]
    by = plot_long_context_positions(rows)
    acc = {t.name: list(t.y) for t in by.data if t.name and t.showlegend and "split" not in t.name}
    for position, g in rows.groupby("position"):  # each position's curve is that position's accuracy, by length
        assert acc[f"gold {position}"] == list(g.groupby("size").correct.mean())
    # the summary carries the same cells
    cell = long_context_summary(rows)["tasks"]["needle"]["6"]["by_position"]
    assert set(cell) == set(rows.position) and all("top_gold_mass" in c for c in cell.values())


@pytest.mark.slow
def test_smollm2_lengths_reach_8k_and_fit_the_context(smol_tokenizer):
    for task, sizes in LENGTHS.items():
        if task == "nq":
            continue  # needs the shared file: tests/test_lost_in_the_middle.py covers its examples
        n = [fl.render(long_context_examples(task, s, 1)[0], smol_tokenizer).n_tokens for s in sizes]
        assert n == sorted(n) and 900 < n[0] < 2000 and 7000 < n[-1] <= 8192, (task, n)
