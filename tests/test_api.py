"""The one API: head selection read one way, interventions as values, the recorder.

Each test asserts numbers that could be wrong: the same heads from every ranking source,
identities (τ = 1, α = 0), an intervention value equal to its context manager and to the
sweep cell, and the recorder equal to a slow reference computed from full patterns.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import TINY_CONFIGS, get_tiny

import focuslens as fl
from focuslens.causal.patching import PatchingResult
from focuslens.model.heads import ranking_of, resolve_heads, top_and_random
from focuslens.model.hooks import attn_hook
from focuslens.model.load import model_id
from focuslens.steer.focus import focus_hooks


def _scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(model.cfg.n_layers, model.cfg.n_heads, generator=g)
    return fl.HeadScores(mean={"gold": values}, metadata={"model": model_id(model)})


def _dirs(model, ranking, scale=3.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    return fl.FocusDirections(torch.randn(shape, generator=g) * scale, torch.zeros(shape), ranking,
                              {"model": model_id(model)})


def _prompts(model, n=2, seed=3):
    return [fl.render(ex, model.tokenizer) for ex in fl.make_synthetic_qa(n, n_documents=4, seed=seed)]


def _last(model, prompt):
    return model(prompt.input_ids[None])[0, -1].float()


# ------------------------------------------------------------------ one head selection
def test_an_int_is_the_top_k_of_any_ranking_source():
    model = get_tiny("llama", 2)
    scores = _scores(model)
    pairs = scores.ranking()
    patching = PatchingResult(scores={"exact": scores["gold"]}, per_example={}, metadata={})
    dirs = _dirs(model, pairs)
    want = pairs[:3]
    assert want != sorted(want)  # the order comes from the ranking, not the layout
    for source in (scores, patching, dirs, pairs, [list(h) for h in pairs]):
        assert resolve_heads(model, 3, ranking=source) == want
    assert ranking_of(dirs) == dirs.ranking() == pairs  # a method on both result kinds
    with pytest.raises(fl.DataError, match="heads=9: the ranking has 8 heads"):
        resolve_heads(model, 9, ranking=scores)  # never silently fewer
    with pytest.raises(fl.ModelError, match=r"head \(2, 0\) is outside"):
        resolve_heads(model, [(2, 0)])


def test_split_softmax_and_patching_take_an_int_with_a_ranking():
    model = get_tiny("qwen2", 2)
    scores = _scores(model)
    prompt = _prompts(model, 1)[0]
    plain = _last(model, prompt)
    with fl.split_softmax(model, 3, ranking=scores, prompt=prompt, tau=0.2):
        by_int = _last(model, prompt)
    with fl.split_softmax(model, scores.top_k(3), span=prompt.gold, tau=0.2):
        by_pairs = _last(model, prompt)
    torch.testing.assert_close(by_int, by_pairs)
    assert not torch.allclose(by_int, plain, atol=1e-4)  # it changed something
    pairs = fl.causal.make_counterfactual_pairs(model, fl.make_synthetic_qa(1, n_documents=4, seed=5))
    by_k = fl.causal.patch_heads(model, pairs, heads=2, ranking=scores, methods=("exact",), quiet=True)
    tried = torch.isfinite(by_k["exact"]).nonzero().tolist()
    assert sorted(map(tuple, tried)) == sorted(scores.top_k(2))
    with pytest.raises(fl.ModelError):
        fl.causal.patch_heads(model, pairs, heads=[(0, 7)], quiet=True)


def test_focus_and_its_hook_specs_steer_the_same_heads_by_default():
    model = get_tiny("llama", 4)
    dirs = _dirs(model, _scores(model).ranking())
    prompt = _prompts(model, 1)[0]
    defaults = {f: inspect.signature(f).parameters["heads"].default for f in (fl.focus, focus_hooks, fl.split_softmax)}
    assert set(defaults.values()) == {20} and fl.Focus(dirs).heads == fl.SplitSoftmax().heads == 20
    # the same default, refused alike on a model of 8 heads
    with pytest.raises(fl.DataError, match="heads=20: the ranking has 8 heads"), fl.focus(model, dirs, alpha=0.7):
        pass
    with pytest.raises(fl.DataError, match="heads=20: the ranking has 8 heads"):
        focus_hooks(model, dirs, 0.7)
    with fl.focus(model, dirs, alpha=0.7, heads=5):
        cm = _last(model, prompt)
    with model.hooks(fwd_hooks=focus_hooks(model, dirs, 0.7, 5)):
        specs = _last(model, prompt)
    torch.testing.assert_close(cm, specs)
    assert not torch.allclose(cm, _last(model, prompt), atol=1e-4)


def test_top_and_random_controls_are_seeded_and_outside_the_top():
    model = get_tiny("mistral", 1)
    groups = top_and_random(model, _scores(model), ks=(2, 3), n_random=2, seed=7)
    assert [(g, k, d) for g, k, d, _ in groups] == [("top", 2, 0), ("random", 2, 0), ("random", 2, 1),
                                                   ("top", 3, 0), ("random", 3, 0), ("random", 3, 1)]
    for group, k, _, heads in groups:
        assert len(heads) == k
        if group == "random":
            top = next(h for g, kk, _, h in groups if g == "top" and kk == k)
            assert not set(heads) & set(top)
    assert groups == top_and_random(model, _scores(model), ks=(2, 3), n_random=2, seed=7)


# ------------------------------------------------------------------ interventions as values
@pytest.mark.parametrize("arch,kv", TINY_CONFIGS[:3])
@torch.no_grad()
def test_identities_tau_1_and_alpha_0_change_nothing(arch, kv):
    model = get_tiny(arch, kv)
    scores = _scores(model)
    examples = fl.make_synthetic_qa(2, n_documents=4, seed=8)
    plain = fl.evaluate_next_token(model, examples, quiet=True)
    for iv in (fl.SplitSoftmax(4, ranking=scores, tau=1.0), fl.Focus(_dirs(model, scores.ranking()), alpha=0.0, heads=4)):
        got = fl.evaluate_next_token(model, examples, intervention=iv, quiet=True)
        torch.testing.assert_close(torch.tensor(got.gold_logit.to_numpy()), torch.tensor(plain.gold_logit.to_numpy()),
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", ["all", "answer"])
@torch.no_grad()
def test_accuracy_under_an_intervention_is_the_context_manager_prompt_by_prompt(rows):
    model = get_tiny("qwen2", 1)
    scores = _scores(model)
    examples = fl.make_synthetic_qa(3, n_documents=4, seed=9)
    iv = fl.SplitSoftmax(3, ranking=scores, span="gold", tau=0.1, rows=rows)
    table = fl.evaluate_next_token(model, examples, intervention=iv, quiet=True)
    changed = 0
    for i, ex in enumerate(examples):
        prompt, gold = fl.render(ex, model.tokenizer), _gold(model, ex)
        with iv.on(model, prompt):
            want = _last(model, prompt)
        assert table.gold_logit[i] == pytest.approx(float(want[gold]), abs=1e-4)
        assert table.correct[i] == (int(want.argmax()) == gold)
        changed += int(abs(table.gold_logit[i] - float(_last(model, prompt)[gold])) > 1e-4)
    assert changed > 0  # the intervention changed something


def _gold(model, ex):
    from focuslens.data.render import candidate_token_ids

    return candidate_token_ids(model.tokenizer, ex)[0]


def test_intervention_values_refuse_bad_settings_by_name():
    model = get_tiny("llama", 2)
    with pytest.raises(fl.DataError, match="tau"):
        fl.SplitSoftmax(3, ranking=_scores(model), tau=0.0)
    with pytest.raises(fl.DataError, match="heads=3: an int is the top k of a ranking"):
        fl.SplitSoftmax(3).hooks(model, _prompts(model, 1)[0])
    with pytest.raises(fl.DataError, match="span='doc_9' is not a span of this prompt"):
        fl.SplitSoftmax([(0, 1)], span="doc_9").hooks(model, _prompts(model, 1)[0])
    with pytest.raises(fl.DataError, match="carry no head ranking"):
        fl.Focus(_dirs(model, []), alpha=1.0).hooks(model)


# ------------------------------------------------------------------ the recorder
@pytest.mark.parametrize("arch,kv", TINY_CONFIGS)
@torch.no_grad()
def test_the_recorder_equals_masses_from_full_patterns(arch, kv):
    model = get_tiny(arch, kv)
    prompt = _prompts(model, 1)[0]
    heads = [(1, 3), (0, 0), (1, 1)]
    spans = ("gold", "sink", "question", "doc_2")
    with fl.record(model, heads, spans, prompt=prompt) as rec:
        model(prompt.input_ids[None])
    _, cache = model.run_with_cache(prompt.input_ids[None], names_filter=lambda n: n.endswith("hook_pattern"))
    named = prompt.spans()
    for row, (layer, head) in enumerate(heads):
        pattern = cache[attn_hook(layer, "pattern")][0, head, prompt.answer.start : prompt.answer.end]
        want = [pattern[:, named[s].start : named[s].end].sum(-1).mean() for s in spans]
        torch.testing.assert_close(rec.tensor()[0, row], torch.stack(want).float(), atol=1e-6, rtol=1e-5)
    assert list(rec.table().columns) == list(spans) and list(rec.table().index) == heads


@torch.no_grad()
def test_ablate_is_an_intervention_value_equal_to_the_ablation_engine():
    model = get_tiny("llama", 2)
    examples = fl.make_synthetic_qa(3, n_documents=4, seed=11)
    plain = fl.evaluate_next_token(model, examples, quiet=True)
    same = fl.evaluate_next_token(model, examples, intervention=fl.causal.Ablate([(1, 2)], scale=1.0, rows="answer"), quiet=True)
    torch.testing.assert_close(torch.tensor(same.margin.to_numpy()), torch.tensor(plain.margin.to_numpy()))
    zero = fl.evaluate_next_token(model, examples, intervention=fl.causal.Ablate([(1, 2)], scale=0.0, rows="answer"), quiet=True)
    engine = fl.causal.ablate_heads(model, examples, heads=[(1, 2)], mode="zero", quiet=True)
    drop = torch.tensor((plain.margin - zero.margin).to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(drop, engine.per_example["zero_ablation"][:, 1, 2], atol=1e-4, rtol=1e-4)
    assert drop.abs().max() > 1e-3  # the ablation changed something
    # rows="all" (the default) also edits the positions before the answer rows: a layer-0 head then changes
    # the later layers' keys and values, so the answer differs from the answer-rows-only ablation
    early = [(0, 2)]
    everywhere = fl.evaluate_next_token(model, examples, intervention=fl.causal.Ablate(early, scale=0.0), quiet=True)
    answer_only = fl.evaluate_next_token(model, examples, intervention=fl.causal.Ablate(early, scale=0.0, rows="answer"),
                                         quiet=True)
    assert not torch.allclose(torch.tensor(everywhere.margin.to_numpy()), torch.tensor(answer_only.margin.to_numpy()))


def test_the_trainer_takes_any_training_cache_and_refuses_other_inputs():
    from focuslens.directions.cache import TrainingCache, collect_attention_inputs

    model = get_tiny("llama", 2)
    examples = fl.make_synthetic_qa(2, n_documents=3, seed=12)
    assert isinstance(collect_attention_inputs(model, _prompts(model, 1), quiet=True), TrainingCache)
    with pytest.raises(fl.DataError, match=r"inputs\[0\] is a dict: pass AttentionInputs or ShardedInputs"):
        fl.train_directions(model, examples, None, inputs=({}, None), quiet=True)
