"""Contextual scores: agreement with a slow reference, mass accounting, the paper's format."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from focuslens.causal.patching import PatchingResult
from focuslens.data import Span, make_synthetic_qa, render
from focuslens.errors import DataError, ModelError
from focuslens.measure.scoring import (
    METRICS,
    HeadScores,
    chance_metrics,
    score_heads,
    scores_from_patterns,
    uniform_pattern,
)
from focuslens.model.testing import tiny_model
from focuslens.viz import plot_head_map

ARCH_KV = [("llama", 4), ("llama", 2), ("qwen2", 1), ("qwen2", 2), ("mistral", 2), ("mistral", 1)]


def _reference(model, prompt):
    """Scores of one prompt from the full cached attention pattern (the slow way)."""
    _, cache = model.run_with_cache(prompt.input_ids[None], names_filter=lambda n: n.endswith("hook_pattern"))
    rows = prompt.answer.to_slice()
    out = {}
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, rows]  # [head, rows, key]
        mass = lambda s: pat[..., s.to_slice()].sum(-1).mean(-1)  # noqa: E731
        docs = torch.stack([mass(d) for d in prompt.documents], -1)
        others = torch.cat([docs[:, : prompt.gold_index], docs[:, prompt.gold_index + 1 :]], -1)
        covered = torch.zeros(pat.shape[-1], dtype=torch.bool)
        for s in [*prompt.documents, prompt.sink, prompt.question, prompt.instruction]:
            covered[s.to_slice()] = True
        out[layer] = {
            "gold": docs[:, prompt.gold_index],
            "irrelevant_sum": others.sum(-1),
            "irrelevant_max": others.max(-1).values,
            "sink": mass(prompt.sink),
            "question": mass(prompt.question),
            "instruction": mass(prompt.instruction),
            "uncovered": pat[..., ~covered].sum(-1).mean(-1),
        }
    return out


@pytest.mark.parametrize("arch,kv", ARCH_KV)
def test_scores_match_slow_reference_and_account_for_all_mass(arch, kv):
    model = tiny_model(arch, n_heads=4, n_kv_heads=kv, seed=3)
    examples = make_synthetic_qa(3, n_documents=4, seed=7)
    scores = score_heads(model, examples, n_bootstrap=0, quiet=True)
    refs = [_reference(model, render(ex, model.tokenizer)) for ex in examples]
    for layer in range(model.cfg.n_layers):
        for metric in METRICS:
            expected = torch.stack([r[layer][metric] for r in refs]).mean(0)
            torch.testing.assert_close(scores[metric][layer], expected, atol=1e-5, rtol=1e-4)
        total = sum(scores[m][layer] for m in ("gold", "irrelevant_sum", "sink", "question", "instruction"))
        uncovered = torch.stack([r[layer]["uncovered"] for r in refs]).mean(0)
        torch.testing.assert_close(total + uncovered, torch.ones_like(total), atol=1e-5, rtol=0)
        assert (total <= 1 + 1e-6).all()
        assert (scores["irrelevant_max"][layer] <= scores["irrelevant_sum"][layer] + 1e-7).all()


def test_batched_scoring_equals_unbatched():
    model = tiny_model("qwen2", n_kv_heads=2, seed=1)
    examples = make_synthetic_qa(5, n_documents=3, seed=2) + make_synthetic_qa(2, n_documents=6, seed=3)
    a = score_heads(model, examples, batch_size=1, n_bootstrap=0, quiet=True)
    b = score_heads(model, examples, batch_size=4, n_bootstrap=0, quiet=True)
    for m in METRICS:
        torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-4)


def test_bootstrap_interval_brackets_the_mean_and_results_round_trip(tmp_path):
    model = tiny_model("llama", n_kv_heads=2)
    scores = score_heads(model, make_synthetic_qa(6, n_documents=3), n_bootstrap=200, quiet=True)
    assert (scores.ci_low["gold"] <= scores["gold"] + 1e-7).all()
    assert (scores["gold"] <= scores.ci_high["gold"] + 1e-7).all()
    assert (scores.ci_high["gold"] > scores.ci_low["gold"]).any()
    loaded = HeadScores.load(scores.save(tmp_path / "s.json"), model=model)
    for m in METRICS:
        torch.testing.assert_close(loaded[m], scores[m])
    assert loaded.top_k(5) == scores.top_k(5)
    df = scores.to_dataframe()
    assert len(df) == len(METRICS) * 2 * 4 and set(df.columns) >= {"layer", "head", "metric", "value", "ci_low"}
    best = df[df.metric == "gold"].nlargest(1, "value").iloc[0]
    assert (int(best["layer"]), int(best["head"])) == scores.top_k(1)[0]
    assert "HeadScores" in scores._repr_html_()


def test_results_for_another_model_are_refused(tmp_path):
    model = tiny_model("llama", n_kv_heads=2)
    path = score_heads(model, make_synthetic_qa(2, n_documents=2), n_bootstrap=0, quiet=True).save(tmp_path / "s.json")
    other = tiny_model("llama", n_layers=3, n_kv_heads=2)
    with pytest.raises(ModelError, match="shape"):
        HeadScores.load(path, model=other)
    same_shape = tiny_model("qwen2", n_kv_heads=2)
    with pytest.raises(ModelError, match="tiny-llama"):
        HeadScores.load(path, model=same_shape)


def test_ranking_round_trips_through_the_papers_format(tmp_path):
    model = tiny_model("mistral", n_kv_heads=1)
    scores = score_heads(model, make_synthetic_qa(3, n_documents=3), n_bootstrap=0, quiet=True)
    path = scores.to_ranking_json(tmp_path / "relevant_heads.json")
    ranking = json.loads(path.read_text())
    assert len(ranking) == 8 and sorted(map(tuple, ranking)) == [(l, h) for l in range(2) for h in range(4)]
    assert HeadScores.from_ranking_json(path).top_k(8, "rank_score") == scores.ranking()


def test_released_rankings_load(shared_data):
    for name, shape in {"meta-llama_Llama-3.2-3B-Instruct": (28, 24), "Qwen_Qwen2.5-7B-Instruct": (28, 28)}.items():
        path = shared_data / "focus-direction-release" / name / "relevant_heads.json"
        ranking = json.loads(path.read_text())
        scores = HeadScores.from_ranking_json(path, model=name)
        assert scores.shape == shape
        assert scores.top_k(20, "rank_score") == [tuple(h) for h in ranking[:20]]
    assert HeadScores.from_ranking_json(
        shared_data / "focus-direction-release/meta-llama_Llama-3.2-3B-Instruct/relevant_heads.json"
    ).top_k(1, "rank_score") == [(13, 23)]


def test_bad_input_is_refused(tmp_path):
    model = tiny_model("llama", n_kv_heads=2)
    with pytest.raises(DataError, match="empty"):
        score_heads(model, [], quiet=True)
    prompt = render(make_synthetic_qa(1, n_documents=3)[0], model.tokenizer)
    docs = list(prompt.documents)
    docs[prompt.gold_index] = Span(5, 5)
    with pytest.raises(DataError, match="gold span"):
        score_heads(model, [dataclasses.replace(prompt, documents=tuple(docs))], quiet=True)
    docs[prompt.gold_index] = Span(prompt.n_tokens - 2, prompt.n_tokens + 40)
    with pytest.raises(DataError, match="outside"):
        score_heads(model, [dataclasses.replace(prompt, documents=tuple(docs))], quiet=True)
    with pytest.raises(DataError, match="setting"):
        score_heads(model, make_synthetic_qa(1, n_documents=2), setting="everything", quiet=True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[0, 1], [0]]))
    with pytest.raises(DataError, match="layer, head"):
        HeadScores.from_ranking_json(bad)


def test_gold_only_and_generated_answer_rows():
    model = tiny_model("llama", n_kv_heads=2)
    examples = make_synthetic_qa(2, n_documents=4)
    gold_only = score_heads(model, examples, setting="gold_only", n_bootstrap=0, quiet=True)
    assert gold_only.metadata["n_documents"] == [1]
    assert torch.equal(gold_only["irrelevant_sum"], torch.zeros(2, 4))
    greedy = score_heads(model, examples, answer_rows="gold_answer", n_bootstrap=0, quiet=True)
    assert greedy.metadata["answer_rows"] == "gold_answer"
    assert not torch.equal(greedy["gold"], score_heads(model, examples, n_bootstrap=0, quiet=True)["gold"])


@pytest.mark.slow
def test_smollm2_has_sparse_mid_to_late_contextual_heads(smollm2):
    scores = score_heads(smollm2, make_synthetic_qa(6, n_documents=10, seed=1), n_bootstrap=0, quiet=True)
    assert scores.shape == (30, 9)
    top = scores.top_k(10)
    # sparse: the best head is far above the median head
    assert float(scores["gold"].max()) > 3 * float(scores["gold"].median())
    assert sum(layer >= 5 for layer, _ in top) >= 6


# ------------------------------------------------------------------ chance level
def _hand_prompt():
    """A 12-token prompt with spans set by hand: sink 0, instruction 1-2, documents 3-4 and
    5-7 (gold: the second, 3 tokens), question 8-9, answer rows 10 and 11."""
    model = tiny_model("llama", n_kv_heads=2)
    prompt = render(make_synthetic_qa(1, n_documents=2)[0], model.tokenizer)
    return dataclasses.replace(prompt, input_ids=prompt.input_ids[:12], sink=Span(0, 1), instruction=Span(1, 3),
                               documents=(Span(3, 5), Span(5, 8)), gold_index=1, question=Span(8, 10),
                               questions=(), answer=Span(10, 12))


def test_chance_level_is_the_share_of_uniform_causal_attention():
    # row 10 sees 11 keys, row 11 sees 12: a span of n tokens gets n/11 and n/12
    chance = dict(zip(METRICS, chance_metrics(_hand_prompt()).tolist()))
    assert chance["gold"] == pytest.approx((3 / 11 + 3 / 12) / 2)
    assert chance["irrelevant_sum"] == chance["irrelevant_max"] == pytest.approx((2 / 11 + 2 / 12) / 2)
    assert chance["sink"] == pytest.approx((1 / 11 + 1 / 12) / 2)
    assert chance["question"] == chance["instruction"] == pytest.approx((2 / 11 + 2 / 12) / 2)


def test_score_heads_records_the_chance_level_of_its_prompts(tmp_path):
    model = tiny_model("llama", n_kv_heads=2)
    examples = make_synthetic_qa(2, n_documents=3, seed=4) + make_synthetic_qa(1, n_documents=5, seed=5)
    scores = score_heads(model, examples, n_bootstrap=0, quiet=True)
    prompts = [render(ex, model.tokenizer) for ex in examples]
    # by hand: mean over prompts of the mean over answer rows i of |gold| / (i + 1)
    expected = sum(sum(len(p.gold) / (i + 1) for i in p.answer) / len(p.answer) for p in prompts) / len(prompts)
    assert scores.chance["gold"] == pytest.approx(expected, rel=1e-6)
    assert scores.chance_level() == scores.chance_level("gold") == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(scores.times_chance(), scores["gold"] / expected)
    # a random tiny model attends almost uniformly: every head sits at chance (within 3 %)
    assert ((scores.times_chance() - 1).abs() < 0.03).all()
    df = scores.to_dataframe()
    gold = df[df.metric == "gold"]
    assert list(gold.chance) == pytest.approx([expected] * 8, rel=1e-6) and df.attrs["chance"] == scores.chance
    assert list(gold.times_chance) == pytest.approx(list(gold.value / expected))
    assert f"chance {expected:.3f}" in scores._repr_html_()
    loaded = HeadScores.load(scores.save(tmp_path / "s.json"), model=model)
    assert loaded.chance == pytest.approx(scores.chance)


def test_uniform_attention_scores_exactly_at_chance():
    model = tiny_model("qwen2", n_kv_heads=1)
    prompts = [render(ex, model.tokenizer) for ex in make_synthetic_qa(2, n_documents=3, seed=1)]
    n_rows, n_keys = max(len(p.answer) for p in prompts), max(p.n_tokens for p in prompts)
    pattern = torch.zeros(len(prompts), model.cfg.n_layers, model.cfg.n_heads, n_rows, n_keys)
    for i, p in enumerate(prompts):
        pattern[i, :, :, : len(p.answer), : p.n_tokens] = uniform_pattern(p)
    scores = scores_from_patterns(model, prompts, pattern)
    for m in METRICS:
        torch.testing.assert_close(scores[m], torch.full((2, 4), scores.chance[m]))


def test_old_files_and_rankings_have_no_chance_level(tmp_path):
    scores = HeadScores(mean={"gold": torch.tensor([[0.9, 0.4]])}, metadata={"model": "m"})
    path = scores.save(tmp_path / "old.json")
    blob = json.loads(path.read_text())
    assert blob["chance"] == {}
    del blob["chance"]  # a file written before the chance level existed
    path.write_text(json.dumps(blob))
    old = HeadScores.load(path)
    assert old.chance == {} and math.isnan(old.chance_level()) and old.times_chance().isnan().all()
    assert old.to_dataframe().chance.isna().all() and "chance" not in old._repr_html_()
    assert math.isnan(HeadScores.from_ranking([(0, 1)]).chance_level("rank_score"))


def test_heads_at_or_below_chance_are_marked():
    scores = HeadScores(mean={"gold": torch.tensor([[0.9, 0.4], [0.5, 0.7]])}, chance={"gold": 0.5})
    html = scores._repr_html_()
    assert "chance 0.500" in html and "L0H1 (0.400, ≤ chance)" in html and "L1H0 (0.500, ≤ chance)" in html
    assert "L0H0 (0.900)</td>" in html
    fig = plot_head_map(scores)
    marks = [t for t in fig.data if t.type == "scatter"]
    assert len(marks) == 1 and sorted(zip(marks[0].y, marks[0].x)) == [(0, 1), (1, 0)]  # (layer, head)
    assert "chance 0.500" in fig.data[0].colorbar.title.text and "chance 0.500" in fig.layout.title.text
    unknown = plot_head_map(HeadScores(mean={"gold": torch.tensor([[0.9, 0.4]])}))
    assert [t.type for t in unknown.data] == ["heatmap"] and "chance" not in unknown.layout.title.text


# ------------------------------------------------------------------ load reads rankings too
def test_load_reads_a_ranking_file_as_rank_scores(tmp_path):
    model = tiny_model("llama", n_kv_heads=2)  # 2 layers x 4 heads
    path = tmp_path / "relevant_heads.json"
    path.write_text(json.dumps([[0, 2], [0, 1], [0, 3]]))  # a top-3: never reaches layer 1
    plain = HeadScores.load(path)
    assert plain.shape == (1, 4) and plain.ranking() == [(0, 2), (0, 1), (0, 3)]
    assert plain.metadata["kind"] == "ranking" and plain.names == ["rank_score"]
    shaped = HeadScores.load(path, model=model)  # the model gives the shape
    assert shaped.shape == (2, 4) and shaped.ranking() == [(0, 2), (0, 1), (0, 3)]
    assert shaped.metadata["model"] == "tiny-llama-L2H4KV2"
    scores = score_heads(model, make_synthetic_qa(2, n_documents=3), n_bootstrap=0, quiet=True)
    written = scores.to_ranking_json(tmp_path / "all.json")
    assert HeadScores.load(written, model=model).ranking() == scores.ranking()


def test_ranking_files_that_cannot_be_read_say_why(tmp_path):
    model = tiny_model("llama", n_kv_heads=2)
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps([[0, 1], [2, 0]]))
    with pytest.raises(ModelError, match=r"head \[2, 0\] is outside 2 layers × 4 heads"):
        HeadScores.load(bad, model=model)
    bad.write_text(json.dumps([[0, 1], [0, 1]]))
    with pytest.raises(DataError, match=r"head \[0, 1\] is ranked more than once"):
        HeadScores.load(bad)
    bad.write_text(json.dumps([[0, 1], [1, 2]]))
    with pytest.raises(DataError, match="looks like a head ranking.*HeadScores.load"):
        PatchingResult.load(bad)
    bad.write_text(json.dumps([[0, 1.5]]))
    with pytest.raises(DataError, match="format='list'"):
        HeadScores.load(bad)
    with pytest.raises(DataError, match="pairs of ints"):
        HeadScores.from_ranking_json(bad)
