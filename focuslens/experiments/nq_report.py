"""What the NQ experiment found (:mod:`focuslens.experiments.nq`): paired gains with
question-clustered CIs, per position, the attention masses before and after, and the run's
cost; written as the ``"nq_focus"`` section of ``summary.json``, tables and a figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from focuslens.experiments.conditions import paired_gain
from focuslens.experiments.stages.base import StageResult
from focuslens.io import json_safe
from focuslens.viz.nq import plot_nq_focus, plot_nq_training

__all__ = ["nq_summary", "write_nq", "condition_rows", "headline"]

_POSITIONS = ("first", "middle", "last")


def condition_rows(table: pd.DataFrame, condition: str, chosen: tuple[int, float], mc=None,
                   kind: str = "logprob") -> pd.DataFrame:
    """One row per test prompt (index ``example``) of ``condition`` in a test table:
    ``"unsteered"`` and ``"focus"``/``"negative_alpha"`` from the grid at the chosen k (α = 0,
    α, −α), ``"magnitude_control"`` at each prompt's own α, the controls as run."""
    k, a = chosen
    t = table[table.kind == kind]
    if kind == "logprob":
        grid = t[(t.condition == "grid") & (t.k == k)]
        by = {"unsteered": 0.0, "focus": a, "negative_alpha": -a}
        if condition in by:
            rows = grid[np.isclose(grid.alpha, by[condition])]
        elif condition == "magnitude_control":
            rows = mc.apply_to_sweep(grid[grid.alpha >= 0])
        else:
            rows = t[t.condition == condition]
    else:
        rows = t[t.condition == condition]
    return rows.drop_duplicates("example").set_index("example").sort_index()


def _gain(steered: pd.Series, base: pd.Series, qids: pd.Series, n_bootstrap: int, seed: int) -> dict:
    """The paired gain over the same prompts, its CI by bootstrap over questions."""
    paired = base.loc[steered.index]
    gain, low, high = paired_gain(steered.to_numpy(), paired.to_numpy(), clusters=qids.loc[steered.index].to_numpy(),
                                  n_bootstrap=n_bootstrap, seed=seed)
    return {"mean": float(steered.mean()), "unsteered": float(paired.mean()), "gain": gain, "gain_ci": [low, high],
            "n_prompts": int(len(steered)), "n_questions": int(qids.loc[steered.index].nunique())}


def _conditions(table: pd.DataFrame, chosen, mc, s) -> dict:
    """Per condition: log-prob and EM, overall and per position, as gains over unsteered."""
    out = {}
    for kind, metric in (("logprob", "gold_logprob"), ("generation", "correct")):
        base = condition_rows(table, "unsteered", chosen, mc, kind)
        for cond in ("focus", "negative_alpha", "random_directions", "random_heads", "magnitude_control",
                     "split_softmax"):
            rows = condition_rows(table, cond, chosen, mc, kind)
            if rows.empty:
                continue
            entry = out.setdefault(cond, {})
            name = "logprob" if kind == "logprob" else "em"
            entry[name] = _gain(rows[metric].astype(float), base[metric].astype(float), base.qid, s.n_bootstrap,
                                s.seed)
            entry[f"{name}_by_position"] = {
                pos: _gain(rows[rows.position == pos][metric].astype(float), base[metric].astype(float), base.qid,
                           s.n_bootstrap, s.seed) for pos in _POSITIONS if (rows.position == pos).any()}
            if cond == "magnitude_control" and kind == "logprob":
                entry["mean_alpha"] = float(rows.alpha.mean())
    return out


def _masses(table: pd.DataFrame, chosen, mc) -> dict:
    """The steered heads' mass from the answer rows on gold, sink and the other documents,
    unsteered and steered, overall and per position: the chosen top-k heads for every
    condition but ``random_heads`` (and ``random_heads_unsteered``, the same random heads
    before steering)."""
    out = {}
    for cond in ("unsteered", "focus", "negative_alpha", "magnitude_control", "random_directions",
                 "split_softmax", "random_heads_unsteered", "random_heads"):
        rows = condition_rows(table, cond, chosen, mc)
        cols = [c for c in ("gold_mass", "sink_mass", "irrelevant_mass") if c in rows]
        out[cond] = {"all": {c: float(rows[c].mean()) for c in cols},
                     **{pos: {c: float(rows[rows.position == pos][c].mean()) for c in cols} for pos in _POSITIONS}}
    return out


def _verdict(em: dict, n_train: int, n_test: int) -> dict:
    """The issue's bar: ≥ 1,000 training and ≥ 300 test questions, and an EM gain whose CI
    is above zero or at most ±4 points wide (a null with power)."""
    low, high = em["gain_ci"]
    half = (high - low) / 2
    sized = n_train >= 1000 and n_test >= 300
    return {"em_gain_ci_lower_above_zero": bool(low > 0), "em_gain_ci_half_width": float(half),
            "powered_null": bool(half <= 0.04 and low <= 0), "paper_size": sized,
            "acceptance_met": bool(sized and (low > 0 or half <= 0.04))}


_NOT_PHASES = ("invocations", "total")


def _costs(costs: dict) -> dict:
    """Seconds per phase (each finished piece's own time, summed over every invocation and
    worker), ``phases`` (their sum), ``total`` (every invocation's wall time: model loading,
    checks, killed pieces and paused time included; two workers at once both count) and the
    number of ``invocations``."""
    phases = {p: float(x) for p, x in costs.items() if p not in _NOT_PHASES}
    return {**phases, "phases": float(sum(phases.values())), "total": float(costs["total"]),
            "invocations": int(costs["invocations"])}


def nq_summary(s, splits, dirs, scores, val, tests, alone, chosen, mc, costs) -> dict:
    """The ``"nq_focus"`` section (module docstring)."""
    k, a = chosen
    v = val.groupby(["k", "alpha"]).gold_logprob.mean()
    meta = dirs.metadata
    top = dirs.ranking()[:k]
    norms = dirs.q.float().norm(dim=-1)
    section = {
        "n_train_questions": len(splits["qids"]["train"]), "n_validation_questions": len(splits["qids"]["validation"]),
        "n_test_questions": len(splits["qids"]["test"]), "n_documents": s.n_documents,
        "test_documents": list(s.test_documents), "positions": list(_POSITIONS), "rows": "answer",
        "metric": {"primary": "teacher-forced log-probability of the gold answer (summed over its tokens)",
                   "em": f"best_subspan_em of the greedy answer ({s.max_new_tokens} new tokens)",
                   "ci": "95% bootstrap over questions (a question's positions resampled together)"},
        "chosen": {"k": k, "alpha": a, "by": "validation mean gold log-prob (alpha > 0)",
                   "val_logprob": float(v.loc[(k, a)]), "val_logprob_unsteered": float(v.loc[(k, 0.0)])},
        "validation_grid": [{"k": int(kk), "alpha": float(aa), "gold_logprob": float(x)} for (kk, aa), x in v.items()],
        "magnitude_control": {"low": mc.low, "high": mc.high, "target": mc.target, "grid": list(mc.grid)},
        "training": {"epochs_run": meta.get("epochs_run"), "history": meta.get("history"),
                     "seconds": float(sum(h.get("seconds", 0.0) for h in meta.get("history") or [])),
                     "val_gold_mass_before": float(np.mean(meta["val_gold_mass_before"])),
                     "val_gold_mass_after": float(np.mean(meta["val_gold_mass_after"])),
                     "dq_norm_top_k": {"median": float(norms[tuple(zip(*top))].median()),
                                       "max": float(norms[tuple(zip(*top))].max())},
                     "norms": dirs.norm_summary(top_k=k), "settings": meta.get("settings")},
        "ranking": {"from": "training split (cache_scores: answer rows -> gold mass)",
                    "top": [[int(x), int(y)] for x, y in dirs.ranking()[:20]],
                    "top_scores": [float(scores[x, y]) for x, y in dirs.ranking()[:20]]},
        "by_documents": {},
        "gold_alone": {"logprob": float(alone.gold_logprob.mean()), "em": float(alone.correct.mean()),
                       "n_questions": int(len(alone))},
        "costs_seconds": _costs(costs),
    }
    for n_docs, table in tests.items():
        section["by_documents"][str(n_docs)] = {"conditions": _conditions(table, chosen, mc, s),
                                                "masses": _masses(table, chosen, mc)}
    main = section["by_documents"][str(s.n_documents)]["conditions"]["focus"]
    section["verdict"] = _verdict(main["em"], section["n_train_questions"], section["n_test_questions"]) | {"logprob_gain_ci": main["logprob"]["gain_ci"]}
    return json_safe(section)


def _table(summary: dict) -> pd.DataFrame:
    """One row per (documents, condition, metric, position): the figure's and the CSV's data."""
    rows = []
    for n_docs, block in summary["by_documents"].items():
        for cond, entry in block["conditions"].items():
            for metric in ("logprob", "em"):
                if metric not in entry:
                    continue
                for pos, g in {"all": entry[metric], **entry.get(f"{metric}_by_position", {})}.items():
                    rows.append({"documents": int(n_docs), "condition": cond, "metric": metric, "position": pos,
                                 "unsteered": g["unsteered"], "mean": g["mean"], "gain": g["gain"],
                                 "gain_low": g["gain_ci"][0], "gain_high": g["gain_ci"][1],
                                 "n_prompts": g["n_prompts"], "n_questions": g["n_questions"]})
    return pd.DataFrame(rows)


def write_nq(out_dir: Path, summary: dict, dirs, val: pd.DataFrame, tests: dict, alone: pd.DataFrame) -> StageResult:
    """The ``"nq_focus"`` stage: ``nq_focus.csv`` (the gains), ``nq_focus_prompts.csv`` (every
    test prompt's rows), ``nq_focus_validation.csv``, ``nq_focus_gold_alone.csv``, the
    directions (``nq_directions/``) and the summary section, saved as one unit of the run
    folder (:meth:`~focuslens.experiments.stages.base.StageResult.save`); then the figure
    ``nq_focus.{png,html}`` and the training curve ``nq_focus_training.{png,html}``."""
    table = _table(summary)
    prompts = pd.concat([t.assign(documents=n) for n, t in tests.items()], ignore_index=True)
    stage = StageResult("nq_focus", summary,
                        tables={"nq_focus": table, "nq_focus_prompts": prompts, "nq_focus_validation": val,
                                "nq_focus_gold_alone": alone},
                        artifacts={"nq_directions": dirs})
    stage.save(out_dir)
    plot_nq_focus(table, summary).save(Path(out_dir) / "nq_focus")
    plot_nq_training(summary["training"]["history"]).save(Path(out_dir) / "nq_focus_training")
    return stage


def headline(summary: dict) -> str:
    """What the run found and cost, in three lines (the CLI prints it)."""
    v, costs, ch = summary["verdict"], summary["costs_seconds"], summary["chosen"]
    main = summary["by_documents"][str(summary["n_documents"])]["conditions"]["focus"]
    em, lp = main["em"], main["logprob"]
    return (f"NQ focus directions (k={ch['k']}, alpha={ch['alpha']:g}; {summary['n_test_questions']} test questions x "
            f"3 positions): EM {em['unsteered']:.3f} -> {em['mean']:.3f}, gain {100 * em['gain']:+.1f} points "
            f"[{100 * em['gain_ci'][0]:+.1f}, {100 * em['gain_ci'][1]:+.1f}]; gold log-prob gain {lp['gain']:+.3f} nats "
            f"[{lp['gain_ci'][0]:+.3f}, {lp['gain_ci'][1]:+.3f}]; acceptance {'met' if v['acceptance_met'] else 'NOT met'}."
            f"\nCost: the phases {costs['phases'] / 3600:.2f} process-hours ("
            + ", ".join(f"{k} {x / 60:.1f} min" for k, x in costs.items() if k not in ("phases", *_NOT_PHASES))
            + f"); all {int(costs['invocations'])} invocation(s) {costs['total'] / 3600:.2f} process-hours of wall time "
            "(loading, checks, killed pieces and pauses included; workers at once each count)")
