"""The end-to-end pipeline behind ``make demo`` / ``focuslens demo``.

Each stage prints its table, writes its figures under ``out_dir`` and adds its section
to ``out_dir/summary.json`` (machine-readable: every number that is printed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["run_demo", "run_distraction", "run_contextual_heads", "run_patching", "update_summary"]


def update_summary(path: str | Path, section: str, data: dict) -> dict:
    """Merge ``{section: data}`` into the JSON file at ``path`` (created if missing)."""
    path = Path(path)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[section] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _print_distraction(summary: dict) -> None:
    acc, cand = summary["accuracy"], summary["candidate_accuracy"]
    print(f"\nDistraction table ({summary['n_prompts']} prompts per row, gold at random positions)")
    print(f"{'documents':>10} {'top-1 acc':>10} {'candidate acc':>14}")
    for n in acc:
        print(f"{n:>10} {acc[n]:>10.3f} {cand[n]:>14.3f}")
    key = next(k for k in summary if k.startswith("by_gold_position_"))
    print(f"\nBy gold position ({key.rsplit('_', 1)[1]} documents)")
    for pos, a in summary[key].items():
        print(f"{pos:>10} {a:>10.3f}")


def run_distraction(
    model,
    *,
    n_prompts: int = 100,
    n_documents=(1, 5, 10, 20),
    seed: int = 0,
    out_dir: str | Path = "figures",
    quiet: bool = False,
) -> dict:
    """Distraction on the synthetic task: table, figure and ``summary.json`` section."""
    from focuslens.data import make_synthetic_qa
    from focuslens.eval import distraction, distraction_summary
    from focuslens.models import model_id
    from focuslens.viz import plot_distraction, save_figure

    examples = make_synthetic_qa(n_prompts, n_documents=max(n_documents), seed=seed)
    rows = distraction(model, examples, n_documents=n_documents, seed=seed, quiet=quiet)
    summary = distraction_summary(rows) | {"model": model_id(model), "task": "synthetic", "seed": seed}
    _print_distraction(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "distraction.csv", index=False)
    fig = plot_distraction(rows, title=f"Distraction on {model_id(model)}: synthetic multi-document QA")
    written = save_figure(fig, out / "distraction")
    print("wrote", ", ".join(str(p) for p in written))
    update_summary(out / "summary.json", "distraction", summary)
    return summary


def run_contextual_heads(
    model,
    *,
    n_prompts: int = 100,
    n_documents: int = 20,
    seed: int = 1,
    out_dir: str | Path = "figures",
    quiet: bool = False,
):
    """Score every head on synthetic training prompts; print the top 20, draw the map."""
    from focuslens.data import make_synthetic_qa
    from focuslens.scoring import score_heads
    from focuslens.viz import plot_head_map, save_figure

    examples = make_synthetic_qa(n_prompts, n_documents=n_documents, seed=seed)
    scores = score_heads(model, examples, quiet=quiet, data=f"synthetic n_documents={n_documents} seed={seed}")
    out = Path(out_dir)
    scores.save(out / "contextual_heads.json")
    top = scores.top_k(20)
    print(f"\nContextual heads: attention mass from the answer rows to the gold document "
          f"({n_prompts} prompts, {n_documents} documents; 95% bootstrap CI)")
    print(f"{'rank':>4} {'layer':>5} {'head':>4} {'score':>7} {'95% CI':>17} {'irrelevant max':>15} {'sink':>6}")
    for rank, (layer, head) in enumerate(top, 1):
        print(f"{rank:>4} {layer:>5} {head:>4} {float(scores['gold'][layer, head]):>7.3f} "
              f"[{float(scores.ci_low['gold'][layer, head]):.3f}, {float(scores.ci_high['gold'][layer, head]):.3f}] "
              f"{float(scores['irrelevant_max'][layer, head]):>15.3f} {float(scores['sink'][layer, head]):>6.3f}")
    frac = {t: scores.fraction_above(t) for t in (0.1, 0.2)}
    print(f"fraction of heads above 0.1: {frac[0.1]:.4f}, above 0.2: {frac[0.2]:.4f}")
    written = save_figure(plot_head_map(scores), out / "contextual_heads", width=800, height=900)
    print("wrote", ", ".join(str(p) for p in written))
    update_summary(
        out / "summary.json",
        "contextual_heads",
        {
            "top": [[layer, head, round(float(scores["gold"][layer, head]), 4)] for layer, head in top],
            "frac_above_0.1": frac[0.1],
            "frac_above_0.2": frac[0.2],
            "n_prompts": n_prompts,
            "n_documents": n_documents,
            "setting": scores.metadata["setting"],
            "answer_rows": scores.metadata["answer_rows"],
            "accuracy_of_scored_prompts": scores.metadata["accuracy"],
        },
    )
    return scores


def run_patching(
    model,
    scores,
    *,
    n_pairs: int = 8,
    n_candidates: int = 20,
    n_ablation: int = 16,
    seed: int = 2,
    out_dir: str | Path = "figures",
    quiet: bool = False,
) -> dict:
    """Causal importance: attribution patching of every head, exact patching of the top
    contextual heads plus as many random heads, group ablations, rank agreement."""
    import random

    from focuslens.data import make_synthetic_qa
    from focuslens.patching import ablate_head_groups, all_heads, make_counterfactual_pairs, patch_heads, rank_agreement
    from focuslens.viz import plot_rank_agreement, save_figure

    out = Path(out_dir)
    pairs = make_counterfactual_pairs(model, make_synthetic_qa(n_pairs, n_documents=20, seed=seed), seed=seed)
    top = scores.top_k(n_candidates)
    rest = [h for h in all_heads(model) if h not in set(top)]
    candidates = top + random.Random(seed).sample(rest, n_candidates)
    result = patch_heads(model, pairs, heads=candidates, quiet=quiet)
    result.save(out / "patching.json")
    contextual = scores["gold"]
    agree = {
        "contextual_vs_attribution": rank_agreement(contextual, result.scores["attribution"], k=20),
        "contextual_vs_exact": rank_agreement(contextual, result.scores["exact"], k=10),
        "attribution_vs_exact": rank_agreement(result.scores["attribution"], result.scores["exact"], k=10),
    }
    print(f"\nActivation patching ({n_pairs} counterfactual pairs, 20 documents; effect 0 = corrupted, 1 = clean)")
    print(f"{'rank':>4} {'layer':>5} {'head':>4} {'attribution':>12} {'exact':>7} {'contextual':>11}")
    for rank, (layer, head) in enumerate(result.top_k(15, "attribution"), 1):
        exact = float(result.scores["exact"][layer, head])
        print(f"{rank:>4} {layer:>5} {head:>4} {float(result.scores['attribution'][layer, head]):>12.3f} "
              f"{'' if exact != exact else f'{exact:.3f}':>7} {float(contextual[layer, head]):>11.3f}")
    for name, a in agree.items():
        print(f"{name:>26}: Spearman {a['spearman']:+.3f}, top-{a['k']} overlap {a['top_k_overlap']:.2f} (n={a['n']})")

    # group ablation where the model still answers some prompts (5 documents)
    ablation_examples = make_synthetic_qa(n_ablation, n_documents=5, seed=seed + 1)
    ks = tuple(k for k in (5, 10, 20) if 2 * k <= len(all_heads(model)))
    groups = []
    for name, ranking in (("contextual", scores.ranking()), ("attribution", result.ranking("attribution"))):
        df = ablate_head_groups(model, ablation_examples, ranking, ks=ks, n_random=3, seed=seed, quiet=quiet)
        groups.append(df.assign(ranking=name))
    import pandas as pd

    groups = pd.concat(groups, ignore_index=True)
    groups.drop(columns="heads").to_csv(out / "ablation_groups.csv", index=False)
    table = (
        groups[groups.group != "none"]
        .groupby(["ranking", "k", "group"])[["margin_drop", "accuracy"]].mean().unstack("group")
    )
    base = float(groups[groups.group == "none"].accuracy.iloc[0])
    print(f"\nMean-ablating head groups at the answer rows ({n_ablation} prompts, 5 documents; "
          f"accuracy without ablation {base:.3f}); random = mean of 3 draws")
    print(table.round(3).to_string())

    fig = plot_rank_agreement(
        contextual, result.scores["attribution"],
        x_label="contextual score (attention mass on the gold document)",
        y_label="causal effect (attribution patching, 0 = corrupted, 1 = clean)",
        title=f"Contextual score vs causal effect per head ({model.cfg.model_name})<br>"
        f"<sup>Spearman {agree['contextual_vs_attribution']['spearman']:+.2f} over all heads; "
        f"red: top 10 contextual heads</sup>",
        highlight=scores.top_k(10),
    )
    print("wrote", ", ".join(str(p) for p in save_figure(fig, out / "patching_agreement")))
    summary = {
        "spearman": agree["contextual_vs_attribution"]["spearman"],
        "top20_overlap": agree["contextual_vs_attribution"]["top_k_overlap"],
        "causal_ranking": "attribution patching over all heads",
        "n_pairs": n_pairs,
        "agreement": agree,
        "top_causal": [[l, h, round(float(result.scores["attribution"][l, h]), 4)] for l, h in result.top_k(20, "attribution")],
        "group_ablation": {
            "n_prompts": n_ablation,
            "n_documents": 5,
            "accuracy_without_ablation": base,
            "by_ranking": {
                r: {
                    str(k): {
                        "top_accuracy": float(g[(g.k == k) & (g.group == "top")].accuracy.mean()),
                        "random_accuracy": float(g[(g.k == k) & (g.group == "random")].accuracy.mean()),
                        "top_margin_drop": float(g[(g.k == k) & (g.group == "top")].margin_drop.mean()),
                        "random_margin_drop": float(g[(g.k == k) & (g.group == "random")].margin_drop.mean()),
                    }
                    for k in ks
                }
                for r, g in groups.groupby("ranking")
            },
        },
    }
    update_summary(out / "summary.json", "patching", summary)
    return summary


def run_demo(
    model_spec: str = "smollm2-135m-instruct",
    *,
    n_prompts: int = 100,
    seed: int = 0,
    out_dir: str | Path = "figures",
    quiet: bool = False,
) -> dict:
    """Load the model and run every stage of the pipeline; returns the summary."""
    from focuslens.models import load_model

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = load_model(model_spec)
    print(f"loaded {model_spec}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads "
          f"({model.cfg.n_key_value_heads or model.cfg.n_heads} KV heads) in {time.perf_counter() - t0:.1f}s")
    run_distraction(model, n_prompts=n_prompts, seed=seed, out_dir=out_dir, quiet=quiet)
    scores = run_contextual_heads(model, n_prompts=n_prompts, seed=seed + 1, out_dir=out_dir, quiet=quiet)
    run_patching(model, scores, seed=seed + 2, out_dir=out_dir, quiet=quiet)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; summary in {Path(out_dir) / 'summary.json'}")
    return json.loads((Path(out_dir) / "summary.json").read_text())
