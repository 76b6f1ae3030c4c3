"""Causal head importance: counterfactual pairs, exact and attribution patching, ablation.

The fast path (prefix KV cache, batched answer-row re-runs) is checked against slow
references: TransformerLens' ``generic_activation_patch`` and ``attribution_patch`` on the
full prompts, and ``evaluate_next_token`` with a plain ablation hook.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import get_tiny

from focuslens import DataError, ModelError, evaluate_next_token, make_synthetic_qa, render
from focuslens.causal.ablation import ablate_head_groups, ablate_heads, mean_answer_z
from focuslens.causal.engine import forward_answer_z, run_head_groups
from focuslens.causal.patching import (
    PatchingResult,
    activation_patching,
    attribution_patching,
    logit_diff,
    make_counterfactual_pairs,
    patch_heads,
    rank_agreement,
)
from focuslens.data import Document
from focuslens.data.synthetic import CITIES
from focuslens.measure.scoring import HeadScores
from focuslens.model.heads import all_heads

# llama with GQA, qwen2 with MQA (1 KV head) and GQA (2 KV heads)
ARCHS = [("llama", 2), ("qwen2", 1), ("qwen2", 2)]
ARCH_IDS = [f"{a}-kv{k}" for a, k in ARCHS]


#: random tiny models often give a clean pair no logit-difference gap: that one warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:pairs .* have LD_clean ≤ LD_corrupt:UserWarning")


def _examples(n=2, n_documents=6, seed=0):
    return make_synthetic_qa(n, n_documents=n_documents, seed=seed)


# ---------------------------------------------------------------- pairs
def test_pairs_differ_only_at_the_gold_city():
    model = get_tiny("llama", 2)
    examples = _examples(4)
    pairs = make_counterfactual_pairs(model, examples, seed=3)
    for pair, ex in zip(pairs, examples):
        assert pair.clean.n_tokens == pair.corrupt.n_tokens
        assert pair.clean.answer == pair.corrupt.answer
        (pos,) = pair.changed_positions  # one word-level token: the city
        assert pair.clean.gold.start <= pos < pair.clean.gold.end
        city = pair.corrupt.example.answers[0]
        assert city in CITIES and city not in ex.candidates
        assert pair.corrupt.span_text(pair.corrupt.gold).endswith(f"Based in {city}.")
        assert model.tokenizer.decode([pair.corrupt_answer]).strip() == city
        assert model.tokenizer.decode([pair.clean_answer]).strip() == ex.answers[0]
        assert pair.example is ex and pair.seed == 3


def test_pairs_are_seeded():
    tok = get_tiny("llama", 2).tokenizer  # a tokenizer works as well as a model
    examples = _examples(6)
    cities = lambda pairs: [p.corrupt.example.answers[0] for p in pairs]  # noqa: E731
    assert cities(make_counterfactual_pairs(tok, examples, seed=1)) == cities(
        make_counterfactual_pairs(tok, examples, seed=1)
    )
    assert cities(make_counterfactual_pairs(tok, examples, seed=1)) != cities(
        make_counterfactual_pairs(tok, examples, seed=2)
    )


def test_pairs_reject_non_synthetic_examples():
    tok = get_tiny("llama", 2).tokenizer
    ex = _examples(1)[0]
    docs = list(ex.documents)
    docs[ex.gold_index] = Document(ex.gold.title, "Headquartered somewhere.")
    with pytest.raises(DataError, match="Based in"):
        make_counterfactual_pairs(tok, [ex.replace(documents=tuple(docs))])


def test_pairs_raise_when_no_city_is_left():
    tok = get_tiny("llama", 2).tokenizer
    ex = make_synthetic_qa(1, n_documents=len(CITIES), seed=0)[0]  # every city is a candidate
    with pytest.raises(DataError, match="no city"):
        make_counterfactual_pairs(tok, [ex])


# ---------------------------------------------------------------- exact patching
@pytest.mark.parametrize("arch,kv", ARCHS, ids=ARCH_IDS)
def test_patching_every_head_restores_the_clean_logits(arch, kv):
    """All heads' z at the answer rows from the clean run ⇒ the MLPs there see the clean
    inputs too, so the last-position logits are the clean ones."""
    from focuslens.causal.patching import _prepare_pair

    model = get_tiny(arch, kv)
    pair = make_counterfactual_pairs(model, _examples(1))[0]
    run = _prepare_pair(model, pair)
    logits = run_head_groups(run.pc, [all_heads(model), []], run.z_clean, run.rows, batch_size=2)
    clean_logits, _ = forward_answer_z(model, pair.clean)
    assert (logits[0] - clean_logits).abs().max() <= 1e-4
    assert (logits[1] - clean_logits).abs().max() > 1e-4  # the unpatched row is corrupted
    assert logit_diff(logits[1], pair.clean_answer, pair.corrupt_answer).item() == pytest.approx(
        run.ld_corrupt, abs=1e-5
    )


def _reference_exact(model, pair, heads):
    """TransformerLens' generic_activation_patch on the full prompts, answer rows only."""
    import transformer_lens.patching as tl_patching

    rows = pair.clean.answer.to_slice()

    def setter(corrupted, index, clean):
        _, head = index
        corrupted[:, rows, head] = clean[:, rows, head]
        return corrupted

    ld = lambda logits: logit_diff(logits[0, -1], pair.clean_answer, pair.corrupt_answer)  # noqa: E731
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(pair.clean.input_ids[None])
        ld_clean = ld(model(pair.clean.input_ids[None]))
        ld_corrupt = ld(model(pair.corrupt.input_ids[None]))
        patched = tl_patching.generic_activation_patch(
            model, pair.corrupt.input_ids[None], clean_cache, ld, setter, "z",
            index_df=pd.DataFrame(heads, columns=["layer", "head"]),
        )
    return (patched - ld_corrupt) / (ld_clean - ld_corrupt)


@pytest.mark.parametrize("arch,kv", ARCHS, ids=ARCH_IDS)
def test_prefix_cache_patching_equals_full_forward_patching(arch, kv):
    model = get_tiny(arch, kv)
    pair = make_counterfactual_pairs(model, _examples(1))[0]
    heads = [(0, 0), (0, 3), (1, 1), (1, 2)]
    result = activation_patching(model, [pair], heads=heads, batch_size=3, quiet=True)  # 2 batches
    ours = torch.stack([result["exact"][h] for h in heads])
    assert torch.allclose(ours, _reference_exact(model, pair, heads).float(), atol=1e-3, rtol=1e-3)
    assert result["exact"].isnan().sum() == 8 - len(heads)  # NaN where not computed


def test_exact_scores_are_the_mean_of_per_pair_values():
    model = get_tiny("llama", 2)
    pairs = make_counterfactual_pairs(model, _examples(3))
    result = activation_patching(model, pairs, quiet=True)
    assert result.per_example["exact"].shape == (3, 2, 4)
    assert torch.allclose(result["exact"], result.per_example["exact"].mean(0))
    assert result.metadata["n_pairs"] == 3 and result.metadata["model"] == model.cfg.model_name
    assert len(result.metadata["ld_clean"]) == 3


# ---------------------------------------------------------------- attribution
def test_attribution_equals_transformer_lens_attribution_patch():
    """Same numbers as TL's attribution_patch (full prompts, forward + backward), summed
    over the answer rows and normalised by the LD gap."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    model = get_tiny("qwen2", 2)
    pair = make_counterfactual_pairs(model, _examples(1))[0]
    ours = attribution_patching(model, [pair], quiet=True)["attribution"]
    ld = lambda logits: logit_diff(logits[0, -1], pair.clean_answer, pair.corrupt_answer)  # noqa: E731
    # attribution_patch needs something upstream that requires grad; load_model freezes
    # every parameter, so unfreeze the embedding for the reference run only.
    embed = model.embed.weight if hasattr(model.embed, "weight") else next(model.embed.parameters())
    embed.requires_grad_(True)
    try:
        clean, corrupt = pair.clean.input_ids[None], pair.corrupt.input_ids[None]
        scores = attribution_patch(model, clean, corrupt, ld).node_scores
    finally:
        embed.requires_grad_(False)
    with torch.no_grad():
        gap = ld(model(pair.clean.input_ids[None])) - ld(model(pair.corrupt.input_ids[None]))
    ref = torch.zeros(2, 4)
    for node, value in scores.items():
        if node.kind == "attn_head_out" and node.position in pair.clean.answer:
            ref[node.layer, node.head] += value
    assert torch.allclose(ours, ref / gap, atol=1e-4, rtol=1e-3)


def test_patch_heads_shares_one_pass_and_scores_all_heads_by_attribution():
    model = get_tiny("llama", 2)
    pairs = make_counterfactual_pairs(model, _examples(2))
    both = patch_heads(model, pairs, heads=[(1, 0), (0, 2)], quiet=True)
    assert both.methods == ["exact", "attribution"]
    assert (~both["exact"].isnan()).sum() == 2 and not both["attribution"].isnan().any()
    alone = activation_patching(model, pairs, heads=[(1, 0), (0, 2)], quiet=True)
    assert torch.allclose(both["exact"], alone["exact"], equal_nan=True)
    with pytest.raises(DataError, match="methods"):
        patch_heads(model, pairs, methods=("integrated",))
    with pytest.raises(ModelError, match="outside"):
        activation_patching(model, pairs, heads=[(5, 0)])


# ---------------------------------------------------------------- ablation
def _zero_head_hook(layer, head, rows):
    def hook(z, hook):
        z = z.clone()
        z[:, rows, head] = 0.0
        return z

    return (f"blocks.{layer}.attn.hook_z", hook)


def test_zero_ablation_matches_a_full_forward_hook():
    model = get_tiny("mistral", 2)
    examples = _examples(2)
    heads = [(0, 1), (1, 3)]
    result = ablate_heads(model, examples, heads=heads, mode="zero", quiet=True)
    clean = evaluate_next_token(model, examples, quiet=True)
    for layer, head in heads:
        drops = []
        for ex, (_, row) in zip(examples, clean.iterrows()):
            rows = render(ex, model.tokenizer).answer.to_slice()
            ablated = evaluate_next_token(model, [ex], hooks=[_zero_head_hook(layer, head, rows)], quiet=True)
            drops.append(row.margin - ablated.margin[0])
        assert result.per_example["zero_ablation"][:, layer, head].tolist() == pytest.approx(drops, abs=1e-4)
    assert result.methods == ["zero_ablation", "zero_ablation_accuracy"]


def test_mean_ablation_uses_the_dataset_mean_at_the_answer_rows():
    model = get_tiny("llama", 1)
    examples = _examples(3)
    prompts = [render(ex, model.tokenizer) for ex in examples]
    mean_z = mean_answer_z(model, prompts)
    assert mean_z.shape == (2, 4, 16)
    two_pass = ablate_heads(model, examples, mode="mean", quiet=True)
    streamed = ablate_heads(model, examples, mode="mean", mean_z=mean_z, quiet=True)
    assert torch.allclose(two_pass["mean_ablation"], streamed["mean_ablation"], atol=1e-5)
    assert not two_pass["mean_ablation"].isnan().any()
    assert two_pass["mean_ablation_accuracy"].abs().max() <= 1


def test_group_ablation_rows_and_consistency_with_single_heads():
    model = get_tiny("qwen2", 2)
    examples = _examples(2)
    ranking = [(1, 2), (0, 0), (1, 0), (0, 3)]

    def groups(seed):
        return ablate_head_groups(
            model, examples, ranking, ks=(1, 3), n_random=3, mode="zero", seed=seed, quiet=True
        )

    df = groups(seed=0)
    assert list(df.group) == ["none"] + (["top"] + ["random"] * 3) * 2
    assert df.margin_drop[0] == 0.0
    top3 = df[(df.group == "top") & (df.k == 3)].heads.item()
    assert top3 == [[1, 2], [0, 0], [1, 0]]
    for heads in df[(df.group == "random") & (df.k == 3)].heads:
        assert len(heads) == 3 and not {tuple(h) for h in heads} & {(1, 2), (0, 0), (1, 0)}
    single = ablate_heads(model, examples, heads=[(1, 2)], mode="zero", quiet=True)
    top1 = df[(df.group == "top") & (df.k == 1)].margin_drop.item()
    assert top1 == pytest.approx(float(single["zero_ablation"][1, 2]), abs=1e-4)
    assert list(groups(seed=0).heads) == list(df.heads)
    assert list(groups(seed=1).heads) != list(df.heads)
    with pytest.raises(DataError, match="heads=9: the ranking has"):
        ablate_head_groups(model, examples, ranking, ks=(9,), quiet=True)
    with pytest.raises(DataError, match="mode"):
        ablate_heads(model, examples, mode="resample", quiet=True)


def test_group_ablation_of_two_rankings_in_one_pass_equals_two_separate_runs():
    model = get_tiny("llama", 2)
    examples = _examples(3)
    rankings = {"a": [(1, 0), (0, 1), (1, 2), (0, 3)], "b": [(0, 3), (1, 2), (0, 1), (1, 0)]}
    both = ablate_head_groups(model, examples, rankings, ks=(1, 2), n_random=2, seed=5, batch_size=4, quiet=True)
    assert list(both.group).count("none") == 1 and pd.isna(both.ranking.iloc[0])  # one unablated row for both
    columns = ["group", "k", "draw", "heads", "margin", "correct", "candidate_correct"]
    for name, ranking in rankings.items():
        alone = ablate_head_groups(model, examples, ranking, ks=(1, 2), n_random=2, seed=5, batch_size=4, quiet=True)
        mine = both[both.ranking == name][columns].reset_index(drop=True)
        # the same batches as the ranking alone (7 groups in chunks of 4): equal, not merely close
        pd.testing.assert_frame_equal(mine, alone[alone.group != "none"][columns].reset_index(drop=True), atol=0, rtol=0)


# ---------------------------------------------------------------- results object
def _result():
    exact = torch.full((3, 2), float("nan"))
    exact[0, 1], exact[2, 0], exact[1, 1] = 0.9, 0.5, -0.7
    attrib = torch.tensor([[0.1, 0.8], [-0.6, -0.2], [0.4, 0.0]])
    return PatchingResult(
        scores={"exact": exact, "attribution": attrib},
        per_example={"exact": exact[None].repeat(2, 1, 1)},
        metadata={"model": "m", "n_pairs": 2, "seed": 0},
    )


def test_result_top_k_dataframe_and_html():
    r = _result()
    assert r.top_k(2, "exact") == [(0, 1), (2, 0)]
    assert r.top_k(3, "exact") == [(0, 1), (2, 0), (1, 1)]  # NaNs are never ranked
    with pytest.raises(DataError, match="heads=5: the ranking has 3 heads"):  # never silently fewer
        r.top_k(5, "exact")
    assert r.top_k(2, "exact", absolute=True) == [(0, 1), (1, 1)]
    df = r.to_dataframe()
    assert list(df.columns) == ["layer", "head", "method", "value"]
    assert len(df) == 3 + 6 and set(df.method) == {"exact", "attribution"}
    assert df[(df.method == "exact") & (df.layer == 1)].value.item() == pytest.approx(-0.7)
    assert "L0H1" in r._repr_html_() and "PatchingResult" in repr(r)


def test_result_save_load_roundtrip(tmp_path):
    r = _result()
    loaded = PatchingResult.load(r.save(tmp_path / "p.json"))
    for method in r.methods:
        assert torch.allclose(loaded[method], r[method], equal_nan=True)
    assert torch.allclose(loaded.per_example["exact"], r.per_example["exact"], equal_nan=True)
    assert loaded.metadata == r.metadata
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a focuslens PatchingResult"):
        PatchingResult.load(tmp_path / "bad.json")
    with pytest.raises(ModelError, match=r"shape \(3, 2\) \(layers, heads\) does not fit the model"):
        PatchingResult.load(tmp_path / "p.json", model=get_tiny("llama", 2))


def test_result_merge():
    r = _result()
    other = PatchingResult({"mean_ablation": torch.zeros(3, 2)}, metadata={"model": "m"})
    assert r.merge(other).methods == ["exact", "attribution", "mean_ablation"]
    with pytest.raises(ModelError):
        r.merge(PatchingResult({"x": torch.zeros(2, 2)}, metadata={"model": "m"}))


# ---------------------------------------------------------------- agreement
def test_rank_agreement_known_values():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert rank_agreement(a, a, k=2) == {"spearman": pytest.approx(1.0), "top_k_overlap": 1.0, "n": 4, "k": 2}
    assert rank_agreement(a, -a, k=2)["spearman"] == pytest.approx(-1.0)
    assert rank_agreement(a, -a, k=2)["top_k_overlap"] == 0.0
    # ranks of b = [1, 2.5, 2.5, 4] (a tie): Pearson of the ranks with [1, 2, 3, 4]
    b = torch.tensor([[0.0, 5.0], [5.0, 9.0]])
    expected = 4.5 / math.sqrt(5.0 * 4.5)
    assert rank_agreement(a, b)["spearman"] == pytest.approx(expected)
    # NaNs (heads not computed) are ignored on either side
    c = torch.tensor([[float("nan"), 2.0], [3.0, 4.0]])
    out = rank_agreement(c, torch.tensor([[9.0, 1.0], [2.0, 3.0]]), k=1)
    assert out["n"] == 3 and out["spearman"] == pytest.approx(1.0) and out["top_k_overlap"] == 1.0


def test_rank_agreement_takes_any_per_head_result():
    effects = _result()  # exact: NaN except 3 heads; attribution: every head
    gold = torch.tensor([[0.3, 0.2], [0.9, 0.1], [0.5, 0.4]])
    scores = HeadScores(mean={"sink": -gold, "gold": gold})  # "gold" is the default, not the first metric
    by_tensor = rank_agreement(gold, effects["exact"], k=2)
    assert rank_agreement(scores, effects, k=2) == by_tensor  # defaults: "gold" and the first method "exact"
    assert by_tensor["n"] == 3 and by_tensor["k"] == 2
    # exact heads (0,1)=0.9, (2,0)=0.5, (1,1)=-0.7 vs gold 0.2, 0.5, 0.1: top-2 {(0,1),(2,0)} vs {(2,0),(0,1)}
    assert by_tensor["top_k_overlap"] == 1.0 and by_tensor["spearman"] == pytest.approx(0.5)
    assert rank_agreement(scores, (effects, "attribution"), k=3) == rank_agreement(gold, effects["attribution"], k=3)
    assert rank_agreement((scores, "sink"), scores, k=3)["spearman"] == pytest.approx(-1.0)
    with pytest.raises(DataError, match="scores_b: PatchingResult has no method 'gold'"):
        rank_agreement(scores, (effects, "gold"))
    with pytest.raises(DataError, match="scores_a is a list"):
        rank_agreement([(0, 1)], effects)
    with pytest.raises(DataError, match=r"scores_a \(3, 2\) vs scores_b \(2, 2\)"):
        rank_agreement(scores, torch.zeros(2, 2))


# ---------------------------------------------------------------- the real model
def test_smollm2_patching_is_exact(smollm2):
    """On SmolLM2 (30 layers, GQA 9/3): the every-head patch restores the clean logits and
    a batched prefix-cache patch equals a plain full-forward run_with_hooks patch."""
    from focuslens.causal.patching import _prepare_pair

    pair = make_counterfactual_pairs(smollm2, make_synthetic_qa(1, n_documents=5, seed=0))[0]
    run = _prepare_pair(smollm2, pair)
    heads = [(14, 2), (29, 8)]
    groups = [all_heads(smollm2), *[[h] for h in heads]]
    logits = run_head_groups(run.pc, groups, run.z_clean, run.rows, batch_size=3)
    clean_logits, _ = forward_answer_z(smollm2, pair.clean)
    assert (logits[0] - clean_logits).abs().max() <= 1e-3
    layer, head = heads[0]
    rows = pair.clean.answer.to_slice()

    def patch(z, hook):
        z = z.clone()
        z[:, rows, head] = run.z_clean[layer, :, head]
        return z

    with torch.no_grad():
        full = smollm2.run_with_hooks(
            pair.corrupt.input_ids[None], fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)]
        )[0, -1]
    assert (logits[1] - full).abs().max() <= 1e-3
