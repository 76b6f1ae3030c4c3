"""The field's head scores and interventions (issue 28): each against a slow reference from
full attention patterns or Hugging Face, its identity setting, a guard that it changes
something, GQA / Gemma-3-style configs, and the registries that make a new method one module."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import get_tiny

from focuslens import DataError, evaluate_next_token, make_synthetic_qa, render
from focuslens.measure.evaluate import evaluate_variants
from focuslens.measure.forward import teacher_forced_ids
from focuslens.measure.head_scores import SCORES, HeadScore, rank_heads_by
from focuslens.measure.head_scores.calibrated import content_free
from focuslens.measure.position import position_profile
from focuslens.measure.record import record
from focuslens.measure.scoring import score_heads
from focuslens.model.attention import eager_attention
from focuslens.model.heads import head_masks
from focuslens.model.intervention import METHODS
from focuslens.steer import AttnRank, MethodContext, MsPoE, Pasta, PositionCalibration, SplitSoftmax, SpotLight
from focuslens.steer.calibration import calibrate_masses
from focuslens.steer.ms_poe import group_ratios
from focuslens.steer.reorder import relevance_order
from focuslens.steer.span_mass import reweight_pattern
from focuslens.steer.spotlight import _lift


def _examples(n=4, docs=4, seed=0):
    return make_synthetic_qa(n, n_documents=docs, seed=seed)


def _patterns(model, ids):
    """Every layer's full pattern ``[layer, head, query, key]`` (eager, one prompt)."""
    with torch.no_grad(), eager_attention(model):
        _, cache = model.run_with_cache(ids[None])
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(model.cfg.n_layers)])


def _mass(pattern, rows, span):
    return pattern[:, :, rows.start:rows.end, span.start:span.end].sum(-1).mean(-1)


# ---------------------------------------------------------------- head scores
def test_every_score_is_registered_with_its_paper():
    assert {"contextual", "retrieval", "query_focused", "contrastive", "calibrated", "causal"} <= set(SCORES)
    for cls in SCORES.values():
        assert cls.paper, cls


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_scores_agree_with_a_slow_reference_from_full_patterns(arch):
    model = get_tiny(arch, 2)
    ex = _examples(1)
    names = ["contextual", "query_focused", "contrastive", "calibrated", "retrieval"]
    ranks = rank_heads_by(model, ex, names, n_bootstrap=0, quiet=True)
    p = render(ex[0], model.tokenizer)
    full = _patterns(model, p.input_ids)
    gold, q = p.gold, p.question
    torch.testing.assert_close(ranks["contextual"], _mass(full, p.answer, gold), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ranks["query_focused"], _mass(full, q, gold), atol=1e-5, rtol=1e-4)
    docs = torch.stack([_mass(full, q, d) for d in p.documents], -1)
    others = torch.cat([docs[..., : p.gold_index], docs[..., p.gold_index + 1:]], -1).mean(-1)
    torch.testing.assert_close(ranks["contrastive"], docs[..., p.gold_index] - others, atol=1e-5, rtol=1e-4)
    null = content_free(model, p)
    assert "N/A" in null.span_text(null.question) and null.n_tokens != p.n_tokens
    full_null = _patterns(model, null.input_ids)
    torch.testing.assert_close(ranks["calibrated"], _mass(full, q, gold) - _mass(full_null, null.question, null.gold),
                               atol=1e-5, rtol=1e-4)
    ids = teacher_forced_ids(model.tokenizer, p)
    full_forced = _patterns(model, ids)
    steps = range(p.n_tokens - 1, ids.shape[0] - 1)
    copies = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for i in steps:
        top = full_forced[:, :, i].argmax(-1)  # [layer, head]
        copies += ((top >= gold.start) & (top < gold.end) & (ids[top] == ids[i + 1])).float()
    torch.testing.assert_close(ranks["retrieval"], copies / len(steps))


def test_contextual_score_is_score_heads_gold_metric_and_one_pass_serves_several_scores(tiny_gqa):
    ex = _examples(3)
    ranks = rank_heads_by(tiny_gqa, ex, ["contextual", "query_focused", "contrastive"], n_bootstrap=20, quiet=True)
    torch.testing.assert_close(ranks["contextual"], score_heads(tiny_gqa, ex, n_bootstrap=0, quiet=True)["gold"])
    assert ranks.metrics == ["contextual", "query_focused", "contrastive"]
    assert ranks.ci_low["contextual"].shape == (tiny_gqa.cfg.n_layers, tiny_gqa.cfg.n_heads)
    assert ranks.metadata["scores"]["query_focused"]["rows"] == ["question"]
    calls = []
    handle = tiny_gqa.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        rank_heads_by(tiny_gqa, ex[:1], ["contextual", "query_focused", "contrastive"], n_bootstrap=0, quiet=True)
    finally:
        handle.remove()
    assert len(calls) == 1  # three scores, one forward pass


def test_retrieval_score_counts_copies_and_can_be_one():
    """A head whose top key is always the gold token it writes scores 1: check the counting
    on a forced pattern (argmax placed on the copied token) through the same recorder path."""
    model = get_tiny("llama", 4)
    ex = _examples(1)
    p = render(ex[0], model.tokenizer)
    ids = teacher_forced_ids(model.tokenizer, p)
    answer_pos = [int(j) for j in range(p.gold.start, p.gold.end)]

    def point_at_copy(pattern, hook):  # every head's row i puts all mass on a gold key holding token i+1
        q, k = pattern.shape[-2:]
        out = pattern.clone()
        for row in range(q):
            i = k - q + row
            if i + 1 < ids.shape[0]:
                hits = [j for j in answer_pos if j <= i and int(ids[j]) == int(ids[i + 1])]
                if hits:
                    out[:, :, row] = 0
                    out[:, :, row, hits[0]] = 1
        return out

    hooks = [(f"blocks.{layer}.attn.hook_pattern", point_at_copy) for layer in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=hooks), eager_attention(model):
        ranks = rank_heads_by(model, ex, ["retrieval"], n_bootstrap=0, quiet=True)
    copyable = sum(any(int(ids[j]) == int(ids[i + 1]) for j in answer_pos) for i in range(p.n_tokens - 1, ids.shape[0] - 1))
    assert copyable > 0
    torch.testing.assert_close(ranks["retrieval"], torch.full_like(ranks["retrieval"], copyable / (ids.shape[0] - p.n_tokens)))


def test_a_new_score_is_one_class_and_joins_the_engine():
    class GoldOverSink(HeadScore):
        name = "test_gold_over_sink"
        paper = "a test"

        def columns(self, prompt):
            return {"gold": "gold", "sink": "sink"}

        def combine(self, reading, prompt):
            return reading.column("gold") - reading.column("sink")

    try:
        model = get_tiny("qwen2", 2)
        ranks = rank_heads_by(model, _examples(2), ["contextual", "test_gold_over_sink"], n_bootstrap=0, quiet=True)
        scores = score_heads(model, _examples(2), n_bootstrap=0, quiet=True)
        torch.testing.assert_close(ranks["test_gold_over_sink"], scores["gold"] - scores["sink"], atol=1e-6, rtol=1e-5)
    finally:
        SCORES.pop("test_gold_over_sink", None)


def test_score_errors_name_the_problem():
    model = get_tiny("llama", 2)
    with pytest.raises(DataError, match="not a head score"):
        rank_heads_by(model, _examples(1), ["nope"], quiet=True)
    no_gold = _examples(1)[0].replace(gold_index=None)
    with pytest.raises(DataError, match="no gold"):
        rank_heads_by(model, [no_gold], ["contextual"], quiet=True)


# ---------------------------------------------------------------- span-mass interventions
def _pattern(b=2, h=3, q=4, k=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, q, k, generator=g).mul(2).softmax(-1)


def test_pasta_equals_log_alpha_on_the_other_keys_scores():
    scores = torch.randn(2, 3, 4, 9, generator=torch.Generator().manual_seed(1))
    span = torch.zeros(9, dtype=torch.bool)
    span[2:5] = True
    alpha = 0.05
    reference = (scores + torch.where(span, 0.0, math.log(alpha))).softmax(-1)
    out = reweight_pattern(scores.softmax(-1), span, Pasta.new_mass, torch.tensor(alpha))
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
    assert torch.equal(reweight_pattern(scores.softmax(-1), span, Pasta.new_mass, torch.tensor(1.0)),
                       scores.softmax(-1))


def test_spotlight_lifts_rows_below_the_target_only():
    p = _pattern()
    span = torch.zeros(9, dtype=torch.bool)
    span[6:8] = True
    pi = p[..., span].sum(-1)
    target = float(pi.median())
    out = reweight_pattern(p, span, _lift, torch.tensor(target))
    torch.testing.assert_close(out[..., span].sum(-1), pi.clamp_min(target), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(pi), atol=1e-6, rtol=0)
    above = pi >= target
    torch.testing.assert_close(out[above], p[above])  # target = current mass (or less) changes nothing


@pytest.mark.parametrize("make", [lambda: Pasta("all", alpha=0.1), lambda: SpotLight("all", target=0.6),
                                  lambda: Pasta([(0, 1), (1, 3)], alpha=0.01, rows="answer")],
                         ids=["pasta", "spotlight", "pasta-answer-rows"])
def test_span_mass_interventions_change_logits_identically_on_both_attention_paths(tiny, make):
    ex = _examples(1)
    p = render(ex[0], tiny.tokenizer)
    ids = p.input_ids[None]
    iv = make()
    with torch.no_grad():
        base = tiny(ids)
        with iv.on(tiny, p):
            fast = tiny(ids)
        with eager_attention(tiny), iv.on(tiny, p):
            slow = tiny(ids)
    assert (fast - base).abs().max() > 1e-4  # it changed something
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_identity_strengths_change_nothing(tiny_gqa):
    p = render(_examples(1)[0], tiny_gqa.tokenizer)
    ids = p.input_ids[None]
    profile = position_profile(tiny_gqa, _examples(3, seed=1), quiet=True)
    with torch.no_grad():
        base = tiny_gqa(ids)
        for iv in (Pasta("all", alpha=1.0), SpotLight("all", target=0.0), MsPoE("all", ratio=1.0),
                   PositionCalibration(profile, "all", strength=0.0), SplitSoftmax("all", tau=1.0)):
            with iv.on(tiny_gqa, p):
                assert torch.equal(tiny_gqa(ids), base), iv


def test_span_mass_values_refuse_bad_strengths_by_name():
    with pytest.raises(DataError, match="alpha"):
        Pasta(alpha=0.0)
    with pytest.raises(DataError, match="alpha"):
        Pasta(alpha=2.0)
    with pytest.raises(DataError, match="target"):
        SpotLight(target=1.0)
    with pytest.raises(DataError, match="ratio"):
        MsPoE(ratio=0.0)
    with pytest.raises(DataError, match="rows"):
        MsPoE(rows="answer")


@pytest.mark.parametrize("cls,field,values", [(Pasta, "alpha", [1.0, 0.2, 0.02]), (SpotLight, "target", [0.0, 0.4, 0.8]),
                                              (MsPoE, "ratio", [1.0, 1.5, 2.5])])
def test_variants_in_one_batch_equal_separate_runs(cls, field, values):
    model = get_tiny("mistral", 2)
    ex = _examples(2)
    masks = head_masks(model, [[(0, 0), (1, 2)], [(1, 1)], [(0, 3), (1, 0)]])
    sweep = cls(masks, **{field: torch.tensor(values)})
    df = evaluate_variants(model, ex, sweep, quiet=True)
    for v, value in enumerate(values):
        single = evaluate_next_token(model, ex, intervention=cls(masks[v], **{field: value}), quiet=True)
        got = df[df.variant == v].sort_values("example")
        torch.testing.assert_close(torch.tensor(got.gold_logit.values), torch.tensor(single.gold_logit.values),
                                   atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- Ms-PoE
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_ms_poe_equals_fractional_positions_in_hugging_face(arch):
    from transformers import AutoModelForCausalLM

    model = get_tiny(arch, 1)  # one KV head: every head one ratio, so the reference is one position scale
    ids = render(_examples(1)[0], model.tokenizer).input_ids[None]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(copy.deepcopy(model.original_model.config), attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
        with MsPoE("all", ratio=2.0).on(model):
            steered = model(ids)
        reference = hf(ids, position_ids=(torch.arange(ids.shape[1]).float() / 2.0)[None]).logits
    torch.testing.assert_close(steered, reference, atol=1e-4, rtol=1e-4)


def test_ms_poe_rescales_kv_groups_with_spread_ratios():
    masks = torch.zeros(1, 2, 4, dtype=torch.bool)
    masks[0, 0, 0] = True  # one head of group 0 in layer 0: its whole group
    masks[0, 1, [1, 3]] = True  # heads of both groups in layer 1: ratios 1.2 and 1.8
    r = group_ratios(masks, torch.tensor([1.5]), n_kv=2)
    torch.testing.assert_close(r[0, 0], torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(r[0, 1], torch.tensor([1.2, 1.8]))


def test_ms_poe_in_cached_generation_matches_full_passes():
    """KV-cached decoding (positions from RoPE's cos/sin at every step) gives the tokens that
    full passes over the growing sequence give."""
    from focuslens.model.decode import greedy_tokens

    model = get_tiny("llama", 2)
    p = render(_examples(1)[0], model.tokenizer)
    ids = p.input_ids[None]
    iv = MsPoE([(0, 0), (1, 3)], ratio=1.7)
    with torch.no_grad():
        tokens = greedy_tokens(model, iv.hooks(model, p), ids, None, 3)
        seq = ids
        with iv.on(model, p):
            for step in range(3):
                nxt = model(seq)[0, -1].argmax()
                assert int(tokens[0, step]) == int(nxt)
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


# ---------------------------------------------------------------- calibration and AttnRank
def test_calibrate_masses_keeps_the_total_and_removes_the_bias():
    m = torch.tensor([0.30, 0.05, 0.25])
    base = torch.tensor([0.25, 0.00, 0.20])
    out = calibrate_masses(m, base, torch.tensor(1.0))
    torch.testing.assert_close(out.sum(), m.sum())
    torch.testing.assert_close(out, m.sum() * torch.tensor([0.05, 0.05, 0.05]) / 0.15)
    torch.testing.assert_close(calibrate_masses(m, torch.zeros(3), torch.tensor(1.0)), m)  # no bias: unchanged
    torch.testing.assert_close(calibrate_masses(m, base, torch.tensor(0.0)), m)


def test_calibration_moves_document_masses_as_calibrate_masses_says(tiny_gqa):
    ex = _examples(4, seed=2)
    profile = position_profile(tiny_gqa, ex[1:], quiet=True)
    assert profile.per_token.shape == (tiny_gqa.cfg.n_layers, tiny_gqa.cfg.n_heads, 4)
    p = render(ex[0], tiny_gqa.tokenizer)
    docs = [f"doc_{i + 1}" for i in range(4)]
    with torch.no_grad(), record(tiny_gqa, "all", docs, prompt=p) as before:
        tiny_gqa(p.input_ids[None])
    iv = PositionCalibration(profile, [(1, 2)], strength=1.0)
    with torch.no_grad(), iv.on(tiny_gqa, p), record(tiny_gqa, [(1, 2)], docs, prompt=p) as after:
        tiny_gqa(p.input_ids[None])
    # the reference, row by row from the unsteered pattern of head (1, 2)
    full = _patterns(tiny_gqa, p.input_ids)[1, 2]  # [query, key]
    lengths = torch.tensor([len(s) for s in p.documents], dtype=torch.float32)
    rows = full[p.answer.start:p.answer.end]
    m = torch.stack([rows[:, s.start:s.end].sum(-1) for s in p.documents], -1)
    expected = calibrate_masses(m, profile.per_token[1, 2] * lengths, torch.tensor(1.0)).mean(0)
    torch.testing.assert_close(after.row(0)[0], expected, atol=1e-5, rtol=1e-4)
    assert (after.row(0)[0] - before.table().loc[(1, 2)].values).abs().max() > 1e-4


def test_position_profile_of_content_free_documents_differs_from_real_ones():
    model = get_tiny("llama", 2)
    ex = _examples(3)
    free, real = position_profile(model, ex, quiet=True), position_profile(model, ex, content_free=False, quiet=True)
    assert free.metadata["content_free"] and not real.metadata["content_free"]
    assert not torch.allclose(free.mass, real.mass)
    assert sorted(real.slot_order()) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="one size"):
        position_profile(model, ex + _examples(1, docs=3), quiet=True)


def test_attnrank_puts_the_most_relevant_document_in_the_most_attended_slot():
    model = get_tiny("llama", 2)
    profile = position_profile(model, _examples(3, seed=3), content_free=False, quiet=True)
    ex = _examples(5, seed=4)
    iv = AttnRank(profile)
    for e, r in zip(ex, iv.rewrite(model, ex)):
        order = r.meta["attnrank_order"]
        assert sorted(order) == list(range(4))
        assert [d for d in r.documents] == [e.documents[i] for i in order]
        assert r.documents[r.gold_index] == e.gold
        assert order[profile.slot_order()[0]] == relevance_order(e)[0]
    assert relevance_order(ex[0])[0] == ex[0].gold_index  # BM25 finds the synthetic gold (its company name)
    reordered = evaluate_next_token(model, ex, intervention=iv, quiet=True)
    assert set(reordered.gold_index) == {profile.slot_order()[0]}
    assert iv.hooks(model) == []
    with pytest.raises(DataError, match="slots"):
        iv.rewrite(model, _examples(1, docs=3))


# ---------------------------------------------------------------- the registry
def test_every_intervention_is_registered_and_builds_candidates_that_run():
    assert {"split_softmax", "pasta", "spotlight", "focus", "ms_poe", "calibration", "attnrank"} <= set(METHODS)
    model = get_tiny("llama", 2)
    ex = _examples(4)
    ranking = score_heads(model, ex, n_bootstrap=0, quiet=True)
    context = MethodContext(model, ranking=ranking, k=3, calibration=ex[2:])
    for name, cls in METHODS.items():
        assert cls.PAPER, name
        cands = cls.candidates(context)
        if name == "focus":
            assert cands == []  # no trained directions in this context
            continue
        assert cands, name
        setting, iv = cands[0]
        assert isinstance(setting, dict)
        out = evaluate_next_token(model, ex[:2], intervention=iv, quiet=True)
        assert len(out) == 2
        assert METHODS[name].NEEDS_LABEL == (name in {"split_softmax", "pasta", "spotlight"})


# ---------------------------------------------------------------- the experiment
def test_methods_experiment_runs_resumes_and_refuses_other_settings(tmp_path):
    import pandas as pd

    from focuslens.experiments.methods import MethodsSettings, methods_table, run_methods

    model = get_tiny("llama", 2)
    s = MethodsSettings(run=str(tmp_path / "no_run"), datasets=("synthetic",), n_rank=3, n_validation=3, n_test=5,
                        n_calibration=2, k=2, n_bootstrap=50)
    out = run_methods(model, s, out_dir=tmp_path, quiet=True)
    table = pd.read_csv(tmp_path / "methods_interventions.csv")
    assert set(table.method) == set(METHODS) - {"focus"}  # no directions in that run folder: skipped, and said
    assert "focus" in out["skipped"]["synthetic"]
    assert (table.n_test == 5).all() and (table.gain_low <= table.gain).all() and (table.gain <= table.gain_high).all()
    ranks = pd.read_csv(tmp_path / "methods_rankings.csv")
    assert {"contextual", "causal", "retrieval"} <= set(ranks.score_a) | set(ranks.score_b)
    assert (tmp_path / "methods_interventions.html").is_file() and (tmp_path / "methods_heads_synthetic.html").is_file()
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())["methods"]
    assert summary["interventions"] and summary["rankings"]
    assert "| synthetic |" in methods_table(table)
    again = run_methods(model, s, out_dir=tmp_path, quiet=True)  # every piece read back: the same table
    assert again["interventions"] == out["interventions"]
    with pytest.raises(DataError, match="n_test|settings"):
        run_methods(model, MethodsSettings(**{**s.record(), "n_test": 10, "datasets": ("synthetic",)}),
                    out_dir=tmp_path, quiet=True)


def test_methods_settings_name_bad_fields():
    from focuslens.experiments.methods import MethodsSettings

    with pytest.raises(DataError, match="datasets"):
        MethodsSettings(datasets=("nope",))
    with pytest.raises(DataError, match="nq_path"):
        MethodsSettings(datasets=("nq",))
    with pytest.raises(DataError, match="methods"):
        MethodsSettings(datasets=("synthetic",), methods=("nope",))
    with pytest.raises(DataError, match="n_test"):
        MethodsSettings(datasets=("synthetic",), n_test=0)


def test_every_score_and_intervention_runs_on_smollm2(smollm2):
    """The acceptance's "runs on SmolLM2": every registered score on real prompts, and every
    intervention's first candidate (random directions stand in for trained ones) moving the
    gold logit of a real prompt."""
    from focuslens.directions.artifact import FocusDirections

    ex = make_synthetic_qa(3, n_documents=5, seed=11)
    ranks = rank_heads_by(smollm2, ex[:2], n_bootstrap=0, quiet=True)
    assert set(ranks.metrics) == set(SCORES)
    for m in ranks.metrics:
        assert torch.isfinite(ranks[m]).all() and ranks[m].abs().max() > 0, m
    L, H, d = smollm2.cfg.n_layers, smollm2.cfg.n_heads, smollm2.cfg.d_head
    g = torch.Generator().manual_seed(0)
    dirs = FocusDirections(torch.randn(L, H, d, generator=g), torch.zeros(L, H, d), ranking=ranks.ranking("contextual"))
    context = MethodContext(smollm2, ranking=ranks, k=10, directions=dirs, calibration=ex[1:])
    base = evaluate_next_token(smollm2, ex[:1], quiet=True).gold_logit.iloc[0]
    for name, cls in METHODS.items():
        setting, iv = cls.candidates(context)[-1]
        steered = evaluate_next_token(smollm2, ex[:1], intervention=iv, quiet=True).gold_logit.iloc[0]
        if name == "attnrank" and iv.reorder(ex[0]).meta["attnrank_order"] == list(range(5)):
            continue  # the order it chose is the prompt's own: nothing to move
        assert abs(steered - base) > 1e-3, (name, setting)


def test_a_new_intervention_is_one_class_and_joins_the_comparison(tmp_path):
    """A new method: one dataclass with METHOD and candidates (here a span-mass edit with its
    own new mass), then `focuslens experiment methods` compares it with no other change."""
    import dataclasses

    import pandas as pd

    from focuslens.experiments.methods import MethodsSettings, run_methods
    from focuslens.steer.span_mass import SpanMassEdit

    @dataclasses.dataclass
    class HalfWay(SpanMassEdit):  # the span's mass moves a fraction of the way to 1
        heads: object = 20
        ranking: object = None
        span: object = "gold"
        share: object = 0.5
        rows: object = "all"
        STRENGTH, IDENTITY = "share", 0.0
        METHOD, NEEDS_LABEL, PAPER = "test_half_way", True, "a test"
        new_mass = staticmethod(lambda pi, share: pi + share * (1 - pi))

        @classmethod
        def candidates(cls, context):
            return [({"share": v}, cls(context.k, context.ranking, share=v)) for v in (0.2, 0.6)]

    try:
        model = get_tiny("qwen2", 2)
        s = MethodsSettings(run=str(tmp_path / "none"), datasets=("synthetic",), methods=("test_half_way",),
                            scores=("contextual",), n_rank=2, n_validation=2, n_test=5, n_calibration=2, k=2,
                            n_bootstrap=20)
        run_methods(model, s, out_dir=tmp_path, quiet=True)
        table = pd.read_csv(tmp_path / "methods_interventions.csv")
        assert list(table.method) == ["test_half_way"] and table.needs_label.all()
    finally:
        METHODS.pop("test_half_way", None)


def test_stacked_candidates_equal_each_candidate_alone():
    """The comparison runs a method's candidates as the variants of one value (one batch row
    each, one prefill per prompt at the answer rows): the same numbers as each alone."""
    from focuslens.experiments.methods import stack_candidates

    model = get_tiny("gemma3", 1)
    ex = _examples(3)
    ranking = score_heads(model, ex, n_bootstrap=0, quiet=True)
    context = MethodContext(model, ranking=ranking, k=3, calibration=ex[1:], rows="answer")
    for cls in (Pasta, SpotLight, PositionCalibration, SplitSoftmax):
        cands = [iv for _, iv in cls.candidates(context)]
        stacked = stack_candidates(model, cands)
        assert stacked is not None and stacked.n_variants(model) == len(cands), cls
        together = evaluate_variants(model, ex, stacked, quiet=True)
        for v, iv in enumerate(cands):
            alone = evaluate_next_token(model, ex, intervention=iv, quiet=True)
            torch.testing.assert_close(torch.tensor(together[together.variant == v].gold_logit.values),
                                       torch.tensor(alone.gold_logit.values), atol=1e-4, rtol=1e-4)
    assert stack_candidates(model, [Pasta(2, ranking, alpha=0.1), SpotLight(2, ranking)]) is None
