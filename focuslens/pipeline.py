"""The end-to-end pipeline behind ``make demo`` / ``focuslens demo``.

Each stage prints its table, writes its figures under ``out_dir`` and adds its section
to ``out_dir/summary.json`` (machine-readable: every number that is printed).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pandas as pd
import torch

from focuslens.io import write_csv

__all__ = [
    "run_demo",
    "run_distraction",
    "run_contextual_heads",
    "run_patching",
    "steering_splits",
    "gold_positions",
    "reference_accuracies",
    "run_split_softmax",
    "run_focus_directions",
    "update_summary",
]


def update_summary(path: str | Path, section: str, data: dict) -> dict:
    """Merge ``{section: data}`` into the JSON file at ``path`` (created if missing),
    atomically (:func:`focuslens.io.write_json`)."""
    from focuslens.io import write_json

    path = Path(path)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[section] = data
    write_json(path, summary, indent=2)
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
    from focuslens.figures import draw_distraction
    from focuslens.models import model_id

    examples = make_synthetic_qa(n_prompts, n_documents=max(n_documents), seed=seed)
    rows = distraction(model, examples, n_documents=n_documents, seed=seed, quiet=quiet)
    summary = distraction_summary(rows) | {"model": model_id(model), "task": "synthetic", "seed": seed}
    _print_distraction(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "distraction.csv", rows)
    update_summary(out / "summary.json", "distraction", summary)
    draw_distraction(out)
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
    from focuslens.figures import draw_contextual_heads
    from focuslens.scoring import score_heads

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
    draw_contextual_heads(out)
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
    from focuslens.data import make_synthetic_qa
    from focuslens.figures import draw_patching
    from focuslens.patching import ablate_head_groups, all_heads, make_counterfactual_pairs
    from focuslens.patching import patch_heads, rank_agreement

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
    write_csv(out / "ablation_groups.csv", groups.drop(columns="heads"))
    table = (
        groups[groups.group != "none"]
        .groupby(["ranking", "k", "group"])[["margin_drop", "accuracy"]].mean().unstack("group")
    )
    base = float(groups[groups.group == "none"].accuracy.iloc[0])
    print(f"\nMean-ablating head groups at the answer rows ({n_ablation} prompts, 5 documents; "
          f"accuracy without ablation {base:.3f}); random = mean of 3 draws")
    print(table.round(3).to_string())

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
    draw_patching(out)
    return summary


# ------------------------------------------------------------------ steering (issue: Figs. 3 and 4)
def gold_positions(n_documents: int, n: int = 5) -> tuple[int, ...]:
    """``n`` spread-out gold positions, first and last included, as the paper places them:
    ``max(0, i·N/(n−1) − 1)`` (20 documents: 0, 4, 9, 14, 19; 10 documents: 0, 1, 4, 6, 9);
    every position when there are at most ``n`` documents."""
    if n_documents <= n:
        return tuple(range(n_documents))
    return tuple(sorted({max(0, i * n_documents // (n - 1) - 1) for i in range(n)}))


def steering_splits(
    *, n_train: int = 200, n_validation: int = 100, n_test: int = 200, n_documents: int = 20, seed: int = 4
) -> dict:
    """Synthetic train / validation / test examples for steering, disjoint by seed from the
    other stages. Test questions appear with the gold at each of :func:`gold_positions`
    (``n_test`` prompts in all), for per-position results; the others at random positions."""
    from focuslens.data import make_synthetic_qa

    positions = gold_positions(n_documents)
    n_questions = n_test // len(positions)
    questions = make_synthetic_qa(n_questions, n_documents=n_documents, seed=seed + 2) if n_questions else []
    return {
        "train": make_synthetic_qa(n_train, n_documents=n_documents, seed=seed),
        "validation": make_synthetic_qa(n_validation, n_documents=n_documents, seed=seed + 1),
        "test": [ex.with_gold_at(p) for ex in questions for p in positions],
        "positions": positions,
    }


def _unique(examples):
    """Examples with distinct rendered content (gold-only / no-gold variants of one
    question at several gold positions are the same prompt)."""
    seen, out = set(), []
    for ex in examples:
        key = (ex.documents, ex.question)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def reference_accuracies(model, examples, *, quiet: bool = False) -> dict:
    """Top-1 accuracy with the gold document alone and with it removed."""
    from focuslens.eval import evaluate_next_token

    gold_only = evaluate_next_token(model, _unique([ex.gold_only() for ex in examples]), quiet=quiet, desc="gold only")
    no_gold = evaluate_next_token(model, _unique([ex.without_gold() for ex in examples]), quiet=quiet, desc="no gold")
    return {"gold_only": float(gold_only.correct.mean()), "no_gold": float(no_gold.correct.mean()),
            "n_gold_only": len(gold_only), "n_no_gold": len(no_gold)}


def run_split_softmax(
    model,
    scores,
    test,
    *,
    ks=(1, 5, 10, 20, 50),
    taus=(0.8, 0.5, 0.3, 0.1),
    n_random: int = 3,
    seed: int = 3,
    references: dict | None = None,
    rows: str = "answer",
    out_dir: str | Path = "figures",
    quiet: bool = False,
) -> dict:
    """Split-softmax sweep (paper Fig. 3) on held-out prompts: top-k contextual heads vs
    random heads, every τ; gold-only and no-gold reference lines."""
    from focuslens.figures import draw_split_softmax
    from focuslens.steering import split_softmax_sweep

    out = Path(out_dir)
    ks = tuple(k for k in ks if k <= model.cfg.n_layers * model.cfg.n_heads)
    sweep = split_softmax_sweep(model, test, scores.ranking(), ks=ks, taus=taus, n_random=n_random, seed=seed,
                                rows=rows, quiet=quiet)
    write_csv(out / "split_softmax_sweep.csv", sweep)
    refs = references or reference_accuracies(model, test, quiet=quiet)
    baseline = float(sweep[sweep.group == "none"].correct.mean())
    acc = sweep[sweep.group != "none"].groupby(["group", "k", "tau"]).correct.mean()
    per_draw = sweep[sweep.group == "random"].groupby(["k", "tau", "draw"]).correct.mean()
    mass = sweep[sweep.group == "contextual"].groupby(["k", "tau"]).gold_mass.mean()

    def table(group):
        return {str(k): {"1.0": baseline, **{str(t): float(acc[group, k, t]) for t in taus}} for k in ks}

    summary = {
        "n_test": int(sweep.example.nunique()),
        "baseline": baseline,
        "gold_only": refs["gold_only"],
        "no_gold": refs["no_gold"],
        "contextual": table("contextual"),
        "random": table("random"),
        "random_sd": {str(k): {str(t): float(per_draw[k, t].std()) for t in taus} for k in ks},
        "n_random_draws": n_random,
        "contextual_gold_mass": {str(k): {str(t): float(mass[k, t]) for t in taus} for k in ks},
        "ranking": "contextual scores (gold mass, answer rows), stage 2",
        "rows": rows,
    }
    if 20 in ks:
        best_tau = max(taus, key=lambda t: acc["contextual", 20, t])
        summary["top20"] = {"best_tau": best_tau, "contextual": float(acc["contextual", 20, best_tau]),
                            "random": float(acc["random", 20, best_tau]),
                            "margin_over_random": float(acc["contextual", 20, best_tau] - acc["random", 20, best_tau]),
                            "reaches_gold_only": bool(acc["contextual", 20, best_tau] >= refs["gold_only"])}
    print(f"\nSplit-softmax on {summary['n_test']} held-out prompts (accuracy; baseline {baseline:.3f}, "
          f"gold only {refs['gold_only']:.3f}, no gold {refs['no_gold']:.3f})")
    print(f"{'k':>4} " + " ".join(f"{'ctx t=' + format(t, 'g'):>10} {'rnd t=' + format(t, 'g'):>10}" for t in taus))
    for k in ks:
        print(f"{k:>4} " + " ".join(f"{acc['contextual', k, t]:>10.3f} {acc['random', k, t]:>10.3f}" for t in taus))
    update_summary(out / "summary.json", "split_softmax", summary)
    draw_split_softmax(out)
    return summary


def run_focus_directions(
    model,
    scores,
    splits: dict,
    *,
    ks=(1, 5, 10, 20, 50, None),
    alphas=(-0.5, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 2.0),
    refine=(0.6, 0.8, 1.25, 1.5),
    references: dict | None = None,
    directions=None,
    release_dir: str | Path | None = None,
    section: str = "focus_directions",
    rows: str = "answer",
    out_dir: str | Path = "figures",
    quiet: bool = False,
) -> dict:
    """Train focus directions (or take ``directions``), choose (k, α) on validation, test
    them (paper Fig. 4), compare a per-prompt magnitude control, report direction norms.
    Results go to ``summary.json[section]`` and ``{section}.png/.html``."""
    from focuslens.directions import import_release
    from focuslens.figures import draw_focus_directions
    from focuslens.focusing import MagnitudeControl, best_setting, focus_sweep
    from focuslens.training import train_directions

    out = Path(out_dir)
    if directions is None:
        dirs = train_directions(model, splits["train"], splits["validation"], ranking=scores.ranking(), quiet=quiet,
                                data=f"synthetic, {len(splits['train'])} train / {len(splits['validation'])} validation")
        dirs.save(out / section)
    else:
        dirs = directions
        dirs.ranking = dirs.ranking or scores.ranking()
    meta = dirs.metadata
    if "train_seconds" in meta:
        print(f"\nFocus directions: cached q/k of {meta['data']['n_train'] + meta['data']['n_validation']} prompts in "
              f"{meta['cache_seconds']:.0f}s, trained all {dirs.shape[0] * dirs.shape[1]} heads in "
              f"{meta['train_seconds']:.1f}s ({meta['epochs_run']} epochs); validation gold mass (mean over heads) "
              f"{torch.tensor(meta['val_gold_mass_before']).mean():.4f} -> {torch.tensor(meta['val_gold_mass_after']).mean():.4f}")

    # the method steers with alpha > 0 (alpha < 0 is the control): choose among those
    val = focus_sweep(model, dirs, splits["validation"], ks=ks, alphas=alphas, rows=rows, quiet=quiet)
    first = best_setting(val[val.alpha > 0])
    extra = sorted({round(first["alpha"] * r, 4) for r in refine} - set(alphas) - {0.0})
    if extra:
        val = pd.concat([val, focus_sweep(model, dirs, splits["validation"], ks=ks, alphas=extra, rows=rows,
                                          quiet=quiet)
                         .pipe(lambda d: d[d.alpha != 0])], ignore_index=True)
    best = best_setting(val[val.alpha > 0])
    grid = sorted({*alphas, *extra})
    test = focus_sweep(model, dirs, splits["test"], ks=ks, alphas=grid, rows=rows, quiet=quiet)
    write_csv(out / f"{section}_validation.csv", val)
    write_csv(out / f"{section}_test.csv", test)
    n_docs = splits["test"][0].n_documents
    k_best, a_best = best["k"], best["alpha"]
    at = lambda df, k, a: df[(df.k == k) & (df.alpha == a)]  # noqa: E731
    baseline = float(at(test, k_best, 0.0).correct.mean())
    chosen = at(test, k_best, a_best)
    neg = min(a for a in grid if a < 0) if any(a < 0 for a in grid) else None
    control = MagnitudeControl.fit(val, k=k_best, alpha=a_best)
    controlled = control.apply_to_sweep(test)
    by_pos = lambda df: {str(p): float(v) for p, v in df.groupby("gold_index").correct.mean().items()}  # noqa: E731
    norms = {"trained": dirs.norm_summary(top_k=20)}
    if release_dir and Path(release_dir).is_dir():
        for model_dir in sorted(p for p in Path(release_dir).iterdir() if p.is_dir()):
            norms[model_dir.name] = import_release(model_dir).norm_summary(top_k=20)
    summary = {
        "n_documents": n_docs,
        "rows": rows,
        "n_test": int(test.example.nunique()),
        "n_validation": int(val.example.nunique()),
        "baseline_test": baseline,
        **({f"{k}_test": references[k] for k in ("gold_only", "no_gold")} if references else {}),
        "best": {"k": int(k_best), "alpha": float(a_best), "val_acc": float(best["accuracy"]),
                 "val_baseline": float(at(val, k_best, 0.0).correct.mean()), "test_acc": float(chosen.correct.mean())},
        "improvement_points": 100 * (float(chosen.correct.mean()) - baseline),
        "negative_alpha": neg,
        "negative_alpha_test_acc": float(at(test, k_best, neg).correct.mean()) if neg is not None else None,
        "magnitude_control_test_acc": float(controlled.correct.mean()),
        "magnitude_control": {"target_moved_sink_mass": control.target, "grid": list(control.grid),
                              "mean_alpha_chosen": float(controlled.alpha.mean()),
                              "alpha_quartiles": [float(q) for q in controlled.alpha.quantile([0.25, 0.5, 0.75])]},
        "gold_mass_test": {"before": float(at(test, k_best, 0.0).gold_mass.mean()),
                           "after": float(chosen.gold_mass.mean())},
        "sink_mass_test": {"before": float(at(test, k_best, 0.0).sink_mass.mean()),
                           "after": float(chosen.sink_mass.mean())},
        "by_gold_position_test": {"baseline": by_pos(at(test, k_best, 0.0)), "best": by_pos(chosen),
                                  "magnitude_control": by_pos(controlled)},
        "test_accuracy_grid": {str(k): {str(a): float(v) for a, v in g.items()}
                               for k, g in test.groupby(["k", "alpha"]).correct.mean().unstack().iterrows()},
        "norms": norms,
        "directions": {"source": meta.get("source"), "train_seconds": meta.get("train_seconds"),
                       "cache_seconds": meta.get("cache_seconds"), "epochs_run": meta.get("epochs_run"),
                       **meta.get("settings", {})},
    }
    acc = test.groupby(["k", "alpha"]).correct.mean().unstack()
    print(f"\nFocus directions, test accuracy ({summary['n_test']} prompts, {n_docs} documents) "
          "by k (rows) and alpha (columns):")
    print(acc.round(3).to_string())
    print(f"chosen on validation: k={k_best}, alpha={a_best:g} (val {best['accuracy']:.3f}); test {chosen.correct.mean():.3f} "
          f"vs unsteered {baseline:.3f}; alpha={neg}: {summary['negative_alpha_test_acc']}; "
          f"magnitude control: {summary['magnitude_control_test_acc']}")
    print("norms:", json.dumps(norms))
    update_summary(out / "summary.json", section, summary)
    draw_focus_directions(out, section)
    return summary


def _print_final_table(path: Path) -> None:
    """One table with the headline number of every stage."""
    s = json.loads(path.read_text())
    rows = []
    if "distraction" in s:
        acc = s["distraction"]["accuracy"]
        rows += [(f"accuracy, {n} document(s)", acc[n]) for n in acc]
    if "contextual_heads" in s:
        top = s["contextual_heads"]["top"][0]
        rows.append((f"top contextual head L{top[0]}H{top[1]} (gold mass)", top[2]))
    if "patching" in s:
        rows.append(("contextual vs causal ranking (Spearman)", s["patching"]["spearman"]))
    if "split_softmax" in s:
        ss = s["split_softmax"]
        rows += [("split-softmax: unsteered", ss["baseline"]), ("split-softmax: gold document only", ss["gold_only"]),
                 ("split-softmax: gold document removed", ss["no_gold"])]
        if "top20" in ss:
            t = ss["top20"]
            rows += [(f"split-softmax: top-20 contextual heads, tau={t['best_tau']:g}", t["contextual"]),
                     (f"split-softmax: 20 random heads, tau={t['best_tau']:g}", t["random"])]
    for key in ("focus_directions", "focus_directions_5_documents"):
        if key in s:
            fd = s[key]
            name = f"focus directions ({fd['n_documents']} documents)"
            rows += [(f"{name}: unsteered", fd["baseline_test"]),
                     (f"{name}: k={fd['best']['k']}, alpha={fd['best']['alpha']:g} (chosen on validation)",
                      fd["best"]["test_acc"]),
                     (f"{name}: alpha={fd['negative_alpha']}", fd["negative_alpha_test_acc"]),
                     (f"{name}: magnitude control", fd["magnitude_control_test_acc"])]
    width = max(len(r[0]) for r in rows) if rows else 10
    print("\nSummary (held-out top-1 accuracy unless stated)")
    for name, value in rows:
        print(f"  {name:<{width}}  {'n/a' if value is None else f'{value:.3f}'}")


def run_demo(
    model_spec: str = "smollm2-135m-instruct",
    *,
    n_prompts: int = 100,
    seed: int = 0,
    out_dir: str | Path = "figures",
    release_dir: str | Path | None = None,
    quiet: bool = False,
) -> dict:
    """Load the model and run every stage of the pipeline; returns the summary.
    ``release_dir``: the paper's released directions, to report their norms."""
    from focuslens.models import load_model

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = load_model(model_spec)
    print(f"loaded {model_spec}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads "
          f"({model.cfg.n_key_value_heads or model.cfg.n_heads} KV heads) in {time.perf_counter() - t0:.1f}s")
    run_distraction(model, n_prompts=n_prompts, seed=seed, out_dir=out_dir, quiet=quiet)
    scores = run_contextual_heads(model, n_prompts=n_prompts, seed=seed + 1, out_dir=out_dir, quiet=quiet)
    run_patching(model, scores, seed=seed + 2, out_dir=out_dir, quiet=quiet)
    splits = steering_splits(seed=seed + 4)
    refs = reference_accuracies(model, splits["test"], quiet=quiet)
    run_split_softmax(model, scores, splits["test"], references=refs, out_dir=out_dir, quiet=quiet)
    run_focus_directions(model, scores, splits, references=refs, release_dir=release_dir, out_dir=out_dir, quiet=quiet)
    # where the model still selects the right document (5 documents), the same method
    few = steering_splits(n_documents=5, seed=seed + 8)
    run_focus_directions(model, scores, few, references=reference_accuracies(model, few["test"], quiet=quiet),
                         section="focus_directions_5_documents", out_dir=out_dir, quiet=quiet)
    from focuslens.experiments import run_demo_cell

    run_demo_cell(model, out_dir=out_dir, quiet=quiet)
    from focuslens.figures import draw_cross_family, draw_prompt_views, draw_topk_overlap, write_readme

    draw_prompt_views(out_dir, model)
    draw_cross_family(out_dir, release_dir)
    draw_topk_overlap(out_dir, model, quiet=quiet)
    write_readme(out_dir)
    _print_final_table(Path(out_dir) / "summary.json")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; summary in {Path(out_dir) / 'summary.json'}")
    return json.loads((Path(out_dir) / "summary.json").read_text())
