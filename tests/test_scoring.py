"""Contextual scores: agreement with a slow reference, mass accounting, the paper's format."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from focuslens.data import Span, make_synthetic_qa, render
from focuslens.errors import DataError, ModelError
from focuslens.scoring import METRICS, HeadScores, score_heads
from focuslens.testing import tiny_model

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
