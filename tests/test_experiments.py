"""The focus-conditions grid: rankings, paired CIs, magnitude control, the grid on a tiny model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import get_tiny

from focuslens import DataError, make_synthetic_qa, render
from focuslens.experiments.conditions import (
    ConditionSettings,
    _gold_parts,
    head_rankings,
    paired_gain,
    run_focus_conditions,
    task_splits,
)
from focuslens.steer.focus import MagnitudeControl


def test_paired_gain_is_the_mean_difference_with_a_bootstrap_ci():
    base = np.array([0, 0, 1, 1, 0, 0, 1, 0] * 25)
    better = base.copy()
    better[:40] = 1  # 40 prompts of 200 fixed, none broken
    gain, lo, hi = paired_gain(better, base, n_bootstrap=2000, seed=0)
    assert gain == pytest.approx((better - base).mean())
    assert 0 < lo < gain < hi
    same = paired_gain(base, base)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(DataError, match="no prompts"):
        paired_gain([], [])


def test_magnitude_control_keeps_the_moved_mass_inside_the_calibrated_range():
    rows = []
    for example, scale in enumerate([1.0, 2.0, 4.0, 8.0]):  # prompts moved 1x .. 8x as far per alpha
        for alpha in (0.0, 0.25, 0.5, 1.0):
            rows.append({"example": example, "k": 5, "alpha": alpha, "ranking": "r",
                         "sink_mass": 0.8 - min(0.8, 0.1 * alpha * scale), "correct": True, "margin": 0.0})
    sweep = pd.DataFrame(rows)
    mc = MagnitudeControl.fit(sweep, k=5, alpha=0.5, ranking="r", quantiles=(0.25, 0.75))
    moved = np.array([0.05, 0.1, 0.2, 0.4])  # at alpha 0.5
    assert mc.high == pytest.approx(np.quantile(moved, 0.75)) and mc.low == pytest.approx(np.quantile(moved, 0.25))
    chosen = mc.apply_to_sweep(sweep).set_index("example").alpha.to_dict()
    # the largest alpha whose moved mass stays <= high (0.25): weak prompts get more, strong ones less
    assert chosen == {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.25}
    assert mc.choose([0.0, 0.9, 0.95, 0.99]) == 0.0  # everything overshoots: no steering


def test_gold_parts_split_the_gold_document():
    model = get_tiny("llama", 2)
    ex = make_synthetic_qa(1, n_documents=4, seed=5)[0]
    prompt = render(ex, model.tokenizer)
    parts = _gold_parts(prompt)
    gold = torch.zeros(prompt.n_tokens, dtype=torch.bool)
    gold[prompt.gold.start : prompt.gold.end] = True
    assert not (parts["gold_title"] & parts["gold_answer"]).any()
    assert ((parts["gold_title"] | parts["gold_answer"]) & ~gold).sum() == 0
    answer = [prompt.text[slice(*prompt.char_offsets[j])] for j in parts["gold_answer"].nonzero().flatten()]
    assert "".join(answer).strip() == ex.answers[0]
    title = prompt.text[prompt.char_offsets[prompt.gold.start][0] : prompt.char_offsets[int(parts["gold_title"].nonzero().max())][1]]
    assert title.endswith(f"(Title: {ex.gold.title})")
    assert len(parts["irrelevant"]) == 3 and prompt.gold not in parts["irrelevant"]  # every other document
    assert parts["sink"] == prompt.sink


def test_splits_are_disjoint_by_question_and_test_spans_five_positions():
    s = ConditionSettings(n_train=6, n_validation=4, n_test=10, n_documents=20)
    splits = task_splits("synthetic", "qa_query_aware", s)
    qs = {k: {ex.question for ex in v} for k, v in splits.items()}
    assert not (qs["train"] & qs["test"]) and not (qs["validation"] & qs["test"])
    assert sorted({ex.gold_index for ex in splits["test"]}) == [0, 4, 9, 14, 19]
    assert all(ex.meta["layout"] == "qa_query_aware" for v in splits.values() for ex in v)
    with pytest.raises(DataError, match="multiple of 5"):
        task_splits("synthetic", "qa", ConditionSettings(n_test=7))
    with pytest.raises(DataError, match="nq_path"):
        task_splits("nq", "qa", ConditionSettings())


@pytest.mark.filterwarnings("ignore:pairs .* have LD_clean")  # a random model's counterfactual pairs
def test_the_four_rankings_are_permutations_of_every_head_and_differ():
    model = get_tiny("llama", 2)
    train = make_synthetic_qa(6, n_documents=4, seed=6)
    r = head_rankings(model, train, n_pairs=3, quiet=True)
    assert set(r) == {"contextual", "chance_corrected", "gold_only", "attribution"}
    n = model.cfg.n_layers * model.cfg.n_heads
    assert all(sorted(v) == sorted({tuple(h) for h in v}) and len(v) == n for v in r.values())
    assert len({tuple(v[:3]) for v in r.values()}) > 1  # not one ranking four times


def test_chance_correction_scores_a_uniform_head_zero_and_drops_it_from_the_top():
    """Heads with made-up answer-row patterns: ``U`` spreads its attention evenly over the
    documents (the gold one gets 1/4, the contextual ranking's best score); ``F`` puts 0.2 on
    the gold document only; ``P`` and ``N`` put 0.01 on the gold document or on one
    irrelevant one (chance-corrected +0.01 and −0.01/3); the others read irrelevant
    documents. Chance correction must put ``U`` at ≈ 0: below F and P, above N."""
    from focuslens.measure.scoring import prepare_prompts

    model = get_tiny("llama", 2)
    prompts = prepare_prompts(model, make_synthetic_qa(5, n_documents=4, seed=7), quiet=True)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    U, F, P, N = (0, 0), (0, 1), (0, 2), (0, 3)
    rows, keys = max(len(p.answer) for p in prompts), max(p.n_tokens for p in prompts)
    pattern = torch.zeros(len(prompts), n_layers, n_heads, rows, keys)

    def put(i, head, span, mass):  # ``mass`` spread evenly over ``span``'s keys, on every answer row
        pattern[i, head[0], head[1], :, span.start : span.end] += mass / (span.end - span.start)

    for i, p in enumerate(prompts):
        others = [d for j, d in enumerate(p.documents) if j != p.gold_index]
        for head in ((layer, h) for layer in range(n_layers) for h in range(n_heads)):
            if head == U:
                parts = [(doc, 1 / len(p.documents)) for doc in p.documents]
            else:
                parts = {F: [(p.gold, 0.2)], P: [(p.gold, 0.01)], N: [(others[0], 0.01)]}.get(
                    head, [(doc, 0.2) for doc in others])
                parts.append((p.sink, 1 - sum(m for _, m in parts)))  # the rest on the sink
            for span, mass in parts:
                put(i, head, span, mass)
    r = head_rankings(model, prompts, ("contextual", "chance_corrected"),
                      inputs=SimpleNamespace(pattern=pattern), quiet=True)
    assert r["contextual"][:3] == [U, F, P]  # uncorrected, the uniform head comes first
    assert r["chance_corrected"][:4] == [F, P, U, N]  # corrected: 0.2, 0.01, ≈0, −0.0033, then the rest


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scores_from_the_training_cache_equal_score_heads(arch):
    from focuslens.directions.cache import collect_attention_inputs
    from focuslens.measure.scoring import prepare_prompts, score_heads, scores_from_patterns

    model = get_tiny(arch, 2)  # grouped-query attention: 2 query heads per key head
    examples = make_synthetic_qa(5, n_documents=4, seed=3)
    prompts = prepare_prompts(model, examples, quiet=True)
    captured = scores_from_patterns(model, prompts, collect_attention_inputs(model, prompts, quiet=True).pattern)
    direct = score_heads(model, examples, n_bootstrap=0, quiet=True)
    for metric in direct.metrics:
        torch.testing.assert_close(captured[metric], direct[metric], atol=1e-6, rtol=0)
    assert captured.ranking() == direct.ranking()
    ranked = head_rankings(model, prompts, ("contextual", "chance_corrected"),
                           inputs=collect_attention_inputs(model, prompts, quiet=True))
    assert ranked == head_rankings(model, examples, ("contextual", "chance_corrected"), quiet=True)
    with pytest.raises(DataError, match="does not match 4 prompts"):
        scores_from_patterns(model, prompts[:4], collect_attention_inputs(model, prompts, quiet=True).pattern)


def test_the_grid_on_a_tiny_model_writes_cells_figure_and_summary(tmp_path, monkeypatch, capsys):
    model = get_tiny("llama", 2)
    s = ConditionSettings(n_train=6, n_validation=4, n_test=5, n_documents=4, epochs=2, ks=(2, 4), alphas=(0.5, 2.0),
                          all_rows_ks=(2,), all_rows_alphas=(1.0,), n_pairs=3, n_mechanism=2, n_bootstrap=100,
                          tasks=("synthetic",), layouts=("qa_query_aware",),
                          all_rows=(("synthetic", "qa_query_aware"),))
    s.n_test = 4 * 2  # 4 documents: four gold positions
    out = run_focus_conditions(model, s, out_dir=tmp_path, quiet=True)
    cells = out["cells"]
    assert len(cells) == 4 + 1  # 4 rankings (answer rows) + one rows=all cell
    summary = json.loads((tmp_path / "summary.json").read_text())
    fields = {"task", "layout", "ranking", "rows", "n_test", "baseline", "best", "gain", "gain_ci",
              "negative_alpha_test_acc", "magnitude_control_test_acc"}
    for cell in summary["focus_conditions"]:
        assert fields <= set(cell) and {"k", "alpha", "test_acc"} <= set(cell["best"])
        assert cell["gain"] == pytest.approx(cell["best"]["test_acc"] - cell["baseline"])
        assert cell["gain_ci"][0] <= cell["gain"] <= cell["gain_ci"][1]
        assert cell["best"]["alpha"] > 0 and cell["n_test"] == 8
        # per-prompt magnitude control needs the whole alpha grid: answer rows only
        assert (cell["magnitude_control_test_acc"] is None) == (cell["rows"] == "all")
    assert (tmp_path / "focus_conditions.csv").exists() and (tmp_path / "focus_conditions.html").exists()
    assert set(out["mechanism"].part) == {"gold_title", "gold_answer", "irrelevant", "sink"}
    # a later run of another layout adds its cells and keeps the others'
    s.layouts, s.all_rows, s.rankings = ("qa",), (), ("contextual",)
    run_focus_conditions(model, s, out_dir=tmp_path, quiet=True)
    again = json.loads((tmp_path / "summary.json").read_text())["focus_conditions"]
    assert [(c["layout"], c["ranking"]) for c in again if c["layout"] == "qa"] == [("qa", "contextual")]
    assert sum(c["layout"] == "qa_query_aware" for c in again) == 5
    # a rerun resumes: pairs saved with the same settings are kept, not run again; a pair that
    # fails later in the grid leaves every pair finished before it saved
    import focuslens.experiments.conditions as C

    def fail(model, task, layout, s, quiet):
        raise RuntimeError(f"{task}/{layout} failed")

    monkeypatch.setattr(C, "run_condition", fail)
    kept = run_focus_conditions(model, s, out_dir=tmp_path, quiet=True)
    assert [(c["layout"], c["ranking"]) for c in kept["cells"].to_dict("records")] == [("qa", "contextual")]
    assert "synthetic/qa: already in" in capsys.readouterr().out
    s.tasks = ("synthetic", "synthetic_answer_free")
    with pytest.raises(RuntimeError, match="synthetic_answer_free/qa failed"):
        run_focus_conditions(model, s, out_dir=tmp_path, quiet=True)
    assert json.loads((tmp_path / "summary.json").read_text())["focus_conditions"] == again  # nothing lost
