"""Stages about heads: distraction, contextual heads (paper §3.2), causal importance."""

from __future__ import annotations

import random

import pandas as pd

from focuslens.causal.ablation import ablate_head_groups
from focuslens.causal.patching import make_counterfactual_pairs, patch_heads, rank_agreement
from focuslens.data import make_synthetic_qa
from focuslens.experiments.stages.base import StageResult
from focuslens.measure.distraction import distraction, distraction_summary
from focuslens.measure.scoring import score_heads
from focuslens.model.heads import all_heads, random_heads_outside
from focuslens.model.load import model_id

__all__ = ["run_distraction", "run_contextual_heads", "run_patching", "SCORING_SETTINGS"]

#: the extra scoring settings of the contextual-heads stage (name -> score_heads arguments),
#: compared with the main ranking in the ``topk_overlap`` figure
SCORING_SETTINGS = {
    "gold_only": {"setting": "gold_only", "answer_rows": "prefix"},
    "greedy": {"setting": "documents", "answer_rows": "greedy"},
}


# ------------------------------------------------------------------ distraction
def run_distraction(model, *, n_prompts: int = 100, n_documents=(1, 5, 10, 20), seed: int = 0,
                    quiet: bool = False) -> StageResult:
    """Distraction on the synthetic task: accuracy by number of documents and gold position."""

    examples = make_synthetic_qa(n_prompts, n_documents=max(n_documents), seed=seed)
    rows = distraction(model, examples, n_documents=n_documents, seed=seed, quiet=quiet)
    summary = distraction_summary(rows) | {"model": model_id(model), "task": "synthetic", "seed": seed}
    acc, cand = summary["accuracy"], summary["candidate_accuracy"]
    print(f"\nDistraction table ({summary['n_prompts']} prompts per row, gold at random positions)")
    print(f"{'documents':>10} {'top-1 acc':>10} {'candidate acc':>14}")
    for n in acc:
        print(f"{n:>10} {acc[n]:>10.3f} {cand[n]:>14.3f}")
    key = next(k for k in summary if k.startswith("by_gold_position_"))
    print(f"\nBy gold position ({key.rsplit('_', 1)[1]} documents)")
    for pos, a in summary[key].items():
        print(f"{pos:>10} {a:>10.3f}")
    return StageResult("distraction", summary, tables={"distraction": rows})


# ------------------------------------------------------------------ contextual heads
def run_contextual_heads(model, *, n_prompts: int = 100, n_documents: int = 20, seed: int = 1,
                         n_settings: int = 50, quiet: bool = False) -> StageResult:
    """Score every head on synthetic prompts (paper §3.2); print the top 20. The first
    ``n_settings`` prompts are also scored under :data:`SCORING_SETTINGS` (0: skip)."""

    examples = make_synthetic_qa(n_prompts, n_documents=n_documents, seed=seed)
    scores = score_heads(model, examples, quiet=quiet, data=f"synthetic n_documents={n_documents} seed={seed}")
    top = scores.top_k(min(20, len(scores.ranking())))  # a tiny model has fewer heads
    print(f"\nContextual heads: attention mass from the answer rows to the gold document "
          f"({n_prompts} prompts, {n_documents} documents; 95% bootstrap CI)")
    print(f"{'rank':>4} {'layer':>5} {'head':>4} {'score':>7} {'95% CI':>17} {'irrelevant max':>15} {'sink':>6}")
    for rank, (layer, head) in enumerate(top, 1):
        print(f"{rank:>4} {layer:>5} {head:>4} {float(scores['gold'][layer, head]):>7.3f} "
              f"[{float(scores.ci_low['gold'][layer, head]):.3f}, {float(scores.ci_high['gold'][layer, head]):.3f}] "
              f"{float(scores['irrelevant_max'][layer, head]):>15.3f} {float(scores['sink'][layer, head]):>6.3f}")
    frac = {t: scores.fraction_above(t) for t in (0.1, 0.2)}
    print(f"fraction of heads above 0.1: {frac[0.1]:.4f}, above 0.2: {frac[0.2]:.4f}")
    artifacts = {"contextual_heads": scores}
    subset = make_synthetic_qa(n_settings, n_documents=n_documents, seed=seed) if n_settings else []
    for name, kwargs in SCORING_SETTINGS.items() if subset else ():
        artifacts[f"contextual_heads_{name}"] = score_heads(
            model, subset, n_bootstrap=0, quiet=quiet, data=f"synthetic seed={seed} n={n_settings}", **kwargs)
    summary = {
        "model": model_id(model),
        "top": [[layer, head, round(float(scores["gold"][layer, head]), 4)] for layer, head in top],
        "frac_above_0.1": frac[0.1], "frac_above_0.2": frac[0.2],
        "n_prompts": n_prompts, "n_documents": n_documents,
        "setting": scores.metadata["setting"], "answer_rows": scores.metadata["answer_rows"],
        "accuracy_of_scored_prompts": scores.metadata["accuracy"],
    }
    return StageResult("contextual_heads", summary, artifacts=artifacts)


# ------------------------------------------------------------------ patching
def run_patching(model, scores, *, n_pairs: int = 8, n_candidates: int = 20, n_ablation: int = 16,
                 ablation_ks=(5, 10, 20), seed: int = 2, quiet: bool = False) -> StageResult:
    """Causal importance: attribution patching of every head, exact patching of the top
    contextual heads plus as many random heads, rank agreement, and mean-ablation of the
    top-k heads of both rankings vs random sets (each k of ``ablation_ks`` that leaves as
    many heads outside the top k)."""
    pairs = make_counterfactual_pairs(model, make_synthetic_qa(n_pairs, n_documents=20, seed=seed), seed=seed)
    top = scores.top_k(min(n_candidates, len(scores.ranking())))
    control = random_heads_outside(model, top, n_candidates, random.Random(seed))
    result = patch_heads(model, pairs, heads=top + control, quiet=quiet)
    contextual, effect = scores["gold"], result.scores
    agree = {"contextual_vs_attribution": rank_agreement(contextual, effect["attribution"], k=20),
             "contextual_vs_exact": rank_agreement(contextual, effect["exact"], k=10),
             "attribution_vs_exact": rank_agreement(effect["attribution"], effect["exact"], k=10)}
    print(f"\nActivation patching ({n_pairs} counterfactual pairs, 20 documents; effect 0 = corrupted, 1 = clean)")
    print(f"{'rank':>4} {'layer':>5} {'head':>4} {'attribution':>12} {'exact':>7} {'contextual':>11}")
    for rank, (layer, head) in enumerate(result.ranking("attribution")[:15], 1):
        exact = float(effect["exact"][layer, head])
        print(f"{rank:>4} {layer:>5} {head:>4} {float(effect['attribution'][layer, head]):>12.3f} "
              f"{'' if exact != exact else f'{exact:.3f}':>7} {float(contextual[layer, head]):>11.3f}")
    for name, a in agree.items():
        print(f"{name:>26}: Spearman {a['spearman']:+.3f}, top-{a['k']} overlap {a['top_k_overlap']:.2f} (n={a['n']})")
    # group ablation where the model still answers some prompts (5 documents): both
    # rankings on one prefill per prompt and one mean activation
    n_heads = len(all_heads(model))
    ks = tuple(k for k in ablation_ks if 2 * k <= n_heads) or (n_heads // 2,)  # a small model: half its heads
    groups = ablate_head_groups(model, make_synthetic_qa(n_ablation, n_documents=5, seed=seed + 1),
                                {"contextual": scores.ranking(), "attribution": result.ranking("attribution")},
                                ks=ks, n_random=3, seed=seed, quiet=quiet)
    summary = {
        "model": model_id(model),
        "spearman": agree["contextual_vs_attribution"]["spearman"],
        "top20_overlap": agree["contextual_vs_attribution"]["top_k_overlap"],
        "causal_ranking": "attribution patching over all heads", "n_pairs": n_pairs, "agreement": agree,
        "top_causal": [[la, h, round(float(effect["attribution"][la, h]), 4)] for la, h in result.ranking("attribution")[:20]],
        "group_ablation": _ablation_summary(groups, ks, n_ablation),
    }
    return StageResult("patching", summary, tables={"ablation_groups": groups.drop(columns="heads")},
                       artifacts={"patching": result})


def _ablation_summary(groups: pd.DataFrame, ks, n_ablation: int) -> dict:
    base = float(groups[groups.group == "none"].correct.iloc[0])
    table = (groups[groups.group != "none"].groupby(["ranking", "k", "group"])[["margin_drop", "correct"]]
             .mean().unstack("group"))
    print(f"\nMean-ablating head groups at the answer rows ({n_ablation} prompts, 5 documents; "
          f"accuracy without ablation {base:.3f}); random = mean of 3 draws")
    print(table.round(3).to_string())

    def cell(g, k, group, column):
        return float(g[(g.k == k) & (g.group == group)][column].mean())

    return {"n_prompts": n_ablation, "n_documents": 5, "accuracy_without_ablation": base,
            "by_ranking": {r: {str(k): {"top_accuracy": cell(g, k, "top", "correct"),
                                        "random_accuracy": cell(g, k, "random", "correct"),
                                        "top_margin_drop": cell(g, k, "top", "margin_drop"),
                                        "random_margin_drop": cell(g, k, "random", "margin_drop")} for k in ks}
                           for r, g in groups.groupby("ranking")}}
