"""Steering stages: split-softmax with the gold label (paper Fig. 3), focus directions
without it (Fig. 4), and the views of one held-out prompt."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import torch

from focuslens.data import Document, QAExample, render
from focuslens.directions.train import train_directions
from focuslens.experiments.stages.base import StageResult
from focuslens.measure.evaluate import reference_accuracies
from focuslens.measure.scoring import part_spans, prompt_span_masses, token_window
from focuslens.model.load import model_id
from focuslens.model.prefix import PrefillStore
from focuslens.steer.focus import MagnitudeControl, best_setting, focus_sweep
from focuslens.steer.split_softmax import split_softmax_sweep

__all__ = ["run_split_softmax", "run_focus_directions",
           "run_prompt_views", "example_to_json", "example_from_json"]


# ------------------------------------------------------------------ split-softmax
def run_split_softmax(model, scores, test, *, ks=(1, 5, 10, 20, 50), taus=(0.8, 0.5, 0.3, 0.1), n_random: int = 3,
                      seed: int = 3, references: dict | None = None, rows: str = "answer", prefills=None,
                      quiet: bool = False) -> StageResult:
    """Split-softmax sweep (paper Fig. 3) on held-out prompts: top-k contextual heads vs
    random heads, every τ; gold-only and no-gold references. ``prefills``: a
    :class:`~focuslens.model.prefix.PrefillStore` shared with the other sweeps of ``test``."""

    ks = tuple(k for k in ks if k <= model.cfg.n_layers * model.cfg.n_heads)
    sweep = split_softmax_sweep(model, test, scores.ranking(), ks=ks, taus=taus, n_random=n_random, seed=seed,
                                rows=rows, prefills=prefills, quiet=quiet)
    refs = references or reference_accuracies(model, test, quiet=quiet)
    baseline = float(sweep[sweep.group == "none"].correct.mean())
    acc = sweep[sweep.group != "none"].groupby(["group", "k", "tau"]).correct.mean()
    per_draw = sweep[sweep.group == "random"].groupby(["k", "tau", "draw"]).correct.mean()
    mass = sweep[sweep.group == "top"].groupby(["k", "tau"]).gold_mass.mean()

    def table(group):
        return {str(k): {"1.0": baseline, **{str(t): float(acc[group, k, t]) for t in taus}} for k in ks}

    summary = {
        "model": model_id(model), "n_test": int(sweep.example.nunique()), "baseline": baseline,
        "gold_only": refs["gold_only"], "no_gold": refs["no_gold"],
        "contextual": table("top"), "random": table("random"),
        "random_sd": {str(k): {str(t): float(per_draw[k, t].std()) for t in taus} for k in ks},
        "n_random_draws": n_random,
        "contextual_gold_mass": {str(k): {str(t): float(mass[k, t]) for t in taus} for k in ks},
        "ranking": "contextual scores (gold mass, answer rows), stage 2", "rows": rows,
    }
    if 20 in ks:
        best_tau = max(taus, key=lambda t: acc["top", 20, t])
        top, rnd = float(acc["top", 20, best_tau]), float(acc["random", 20, best_tau])
        summary["top20"] = {"best_tau": best_tau, "contextual": top, "random": rnd, "margin_over_random": top - rnd,
                            "reaches_gold_only": bool(top >= refs["gold_only"])}
    print(f"\nSplit-softmax on {summary['n_test']} held-out prompts (accuracy; baseline {baseline:.3f}, "
          f"gold only {refs['gold_only']:.3f}, no gold {refs['no_gold']:.3f})")
    print(f"{'k':>4} " + " ".join(f"{'top t=' + format(t, 'g'):>10} {'rnd t=' + format(t, 'g'):>10}" for t in taus))
    for k in ks:
        print(f"{k:>4} " + " ".join(f"{acc['top', k, t]:>10.3f} {acc['random', k, t]:>10.3f}" for t in taus))
    return StageResult("split_softmax", summary, tables={"split_softmax_sweep": sweep})


# ------------------------------------------------------------------ focus directions
def run_focus_directions(model, scores, splits: dict, *, ks=(1, 5, 10, 20, 50, None),
                         alphas=(-0.5, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 2.0), refine=(0.6, 0.8, 1.25, 1.5),
                         references: dict | None = None, directions=None, released: dict | None = None,
                         section: str = "focus_directions", rows: str = "answer", prefills=None,
                         training: dict | None = None, quiet: bool = False) -> StageResult:
    """Train focus directions (or take ``directions``), choose (k, α) on validation (a
    first grid, then ``refine`` × the best α), test once (paper Fig. 4); compare a
    per-prompt magnitude control; report direction norms (and those of ``released``:
    name -> :class:`~focuslens.directions.artifact.FocusDirections`). ``prefills`` serves the test
    sweep from prefills shared with other sweeps; the two validation sweeps share one.
    ``training``: keyword arguments of :func:`~focuslens.directions.train.train_directions`
    (``epochs``, ``lr``, ...; default: its own)."""

    if directions is None:
        dirs = train_directions(model, splits["train"], splits["validation"], ranking=scores.ranking(), quiet=quiet,
                                data=f"synthetic, {len(splits['train'])} train / {len(splits['validation'])} validation",
                                **(training or {}))
    else:
        dirs = directions
        dirs = dirs if dirs.ranking() else dirs.with_ranking(scores)
    _print_training(dirs, quiet)
    ks = tuple(k for k in ks if k is None or k <= dirs.shape[0] * dirs.shape[1])  # a small model has fewer heads
    # the method steers with alpha > 0 (alpha < 0 is the control): choose among those
    val_prefills = PrefillStore()
    sweep = lambda examples, grid, store: focus_sweep(model, dirs, examples, ks=ks, alphas=grid, rows=rows,  # noqa: E731
                                                      prefills=store if rows == "answer" else None, quiet=quiet)
    val = sweep(splits["validation"], alphas, val_prefills)
    first = best_setting(val[val.alpha > 0])
    extra = sorted({round(first["alpha"] * r, 4) for r in refine} - set(alphas) - {0.0})
    if extra:
        val = pd.concat([val, sweep(splits["validation"], extra, val_prefills).pipe(lambda d: d[d.alpha != 0])],
                        ignore_index=True)
    val_prefills.clear()
    best = best_setting(val[val.alpha > 0])
    grid = sorted({*alphas, *extra})
    test = sweep(splits["test"], grid, prefills)
    summary = _focus_summary(model, dirs, val, test, best, grid, rows, references, released)
    return StageResult(section, summary, tables={f"{section}_validation": val, f"{section}_test": test},
                       artifacts={section: dirs})


def _print_training(dirs, quiet: bool) -> None:
    meta = dirs.metadata
    if "train_seconds" in meta:
        n = meta["data"]["n_train"] + meta["data"]["n_validation"]
        before, after = (float(torch.tensor(meta[k]).mean()) for k in ("val_gold_mass_before", "val_gold_mass_after"))
        print(f"\nFocus directions: cached q/k of {n} prompts in {meta['cache_seconds']:.0f}s, trained all "
              f"{dirs.shape[0] * dirs.shape[1]} heads in {meta['train_seconds']:.1f}s ({meta['epochs_run']} epochs); "
              f"validation gold mass (mean over heads) {before:.4f} -> {after:.4f}")


def _focus_summary(model, dirs, val, test, best, grid, rows, references, released) -> dict:
    """The numbers of a focus-direction stage (printed too), at the (k, α) chosen on validation."""

    k_best, a_best = best["k"], best["alpha"]
    at = lambda df, k, a: df[(df.k == k) & (df.alpha == a)]  # noqa: E731
    base, chosen = at(test, k_best, 0.0), at(test, k_best, a_best)
    baseline = float(base.correct.mean())
    neg = min(a for a in grid if a < 0) if any(a < 0 for a in grid) else None
    control = MagnitudeControl.fit(val, k=k_best, alpha=a_best)
    controlled = control.apply_to_sweep(test)
    # keyed by the gold's document number as the prompt writes it (Document [1] ... [n])
    by_pos = lambda df: {str(p + 1): float(v) for p, v in df.groupby("gold_index").correct.mean().items()}  # noqa: E731
    norms = {"trained": dirs.norm_summary(top_k=20)} | {n: d.norm_summary(top_k=20) for n, d in (released or {}).items()}
    meta = dirs.metadata
    summary = {
        "model": model_id(model), "n_documents": test.n_documents.iloc[0].item(), "rows": rows,
        "n_test": int(test.example.nunique()), "n_validation": int(val.example.nunique()), "baseline_test": baseline,
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
        "gold_mass_test": {"before": float(base.gold_mass.mean()), "after": float(chosen.gold_mass.mean())},
        "sink_mass_test": {"before": float(base.sink_mass.mean()), "after": float(chosen.sink_mass.mean())},
        "by_gold_position_test": {"baseline": by_pos(base), "best": by_pos(chosen), "magnitude_control": by_pos(controlled)},
        "test_accuracy_grid": {str(k): {str(a): float(v) for a, v in g.items()}
                               for k, g in test.groupby(["k", "alpha"]).correct.mean().unstack().iterrows()},
        "norms": norms,
        "directions": {"source": meta.get("source"), "train_seconds": meta.get("train_seconds"),
                       "cache_seconds": meta.get("cache_seconds"), "epochs_run": meta.get("epochs_run"),
                       **meta.get("settings", {})},
    }
    print(f"\nFocus directions, test accuracy ({summary['n_test']} prompts, {summary['n_documents']} documents) "
          "by k (rows) and alpha (columns):")
    print(test.groupby(["k", "alpha"]).correct.mean().unstack().round(3).to_string())
    print(f"chosen on validation: k={k_best}, alpha={a_best:g} (val {best['accuracy']:.3f}); test "
          f"{chosen.correct.mean():.3f} vs unsteered {baseline:.3f}; alpha={neg}: {summary['negative_alpha_test_acc']}; "
          f"magnitude control: {summary['magnitude_control_test_acc']}")
    print("norms:", json.dumps(norms))
    return summary


# ------------------------------------------------------------------ one held-out prompt
def example_to_json(example) -> dict:
    """A :class:`~focuslens.data.QAExample` as plain JSON (for ``summary.json``)."""

    return dataclasses.asdict(example)


def example_from_json(data: dict):
    """The inverse of :func:`example_to_json`."""

    return QAExample(**{**data, "documents": [Document(**d) for d in data["documents"]]})


def run_prompt_views(model, scores, example, *, directions=None, alpha: float = 1.0, n_heads: int = 20,
                     n_token_heads: int = 5, n_bias_heads: int = 10, quiet: bool = False) -> StageResult:
    """Where the top ``n_heads`` contextual heads look on one held-out prompt: the mass on
    each part and, for the top ``n_token_heads``, on each token around the gold document
    (one forward pass for both); with ``directions``, the key bias ``α·d_q·k_j/√d`` of the
    top ``n_bias_heads`` heads of their ranking. (Fewer when the model has fewer heads.)"""
    prompt = render(example, model.tokenizer, max_length=model.cfg.n_ctx)
    parts = part_spans(prompt)
    window = token_window(prompt)
    both = prompt_span_masses(model, prompt, scores.ranking()[:n_heads], spans={**parts, **{i: (i, i + 1) for i in window}})
    tables = {"document_attention": both[list(parts)], "token_masses": both.loc[scores.ranking()[:n_token_heads], list(window)]}
    if directions is not None:
        tables["key_bias"] = directions.key_bias(model, prompt, alpha, directions.ranking()[:n_bias_heads])
    summary = {"model": model_id(model), "example": example_to_json(example), "alpha": alpha,
               "window": [window.start, window.end], "n_heads": len(both)}
    return StageResult("prompt_views", summary, tables=tables, objects={"prompt": prompt})
