"""Two trained model families side by side: SmolLM2-135M-Instruct (Llama architecture) and
Gemma 3 270M (base model: one KV head, head size 256, QK-norm, sliding-window layers), with
the paper's released Llama-3.2-3B and Qwen2.5-7B directions in the same figures.

:func:`run_families` runs the whole demo pipeline (:func:`~focuslens.experiments.pipeline.run_demo`:
distraction, contextual heads, patching, split-softmax top-k vs random, focus directions
trained and swept; then the trained directions swept again with every row steered,
:func:`all_rows_stage`) on every model with the **same recipe** (one
:class:`~focuslens.experiments.pipeline.DemoSettings`), each into its own folder (a killed
run resumes: the stages its folder already holds for these settings are read back; or a
finished demo run of the same settings is read from its folder, ``reuse``), then writes
the comparison: the ``"families"`` section of ``summary.json``, ``families.csv`` and the
figures ``families`` (distraction vs documents, split-softmax top-k vs random, focus
directions' validation-chosen cell on test, where the top heads sit), ``families_head_locations``
(heads on a relative-depth axis, Gemma's global-attention layers marked),
``families_direction_norms``, ``families_norm_vs_rank``, ``families_key_bias`` (the bias
each family's directions add to each part of one shared prompt, ``families_key_bias.csv``)
and ``families_depth_overlap`` (how alike the models' top-20 depth profiles are, also in
the summary as ``depth_overlap``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from focuslens.data import render
from focuslens.data.splits import steering_splits
from focuslens.directions.artifact import bias_by_part
from focuslens.errors import DataError
from focuslens.experiments.figures import _save
from focuslens.experiments.pipeline import DemoSettings, load_release, load_results, run_demo
from focuslens.experiments.stages.base import load_stage
from focuslens.experiments.stages.steer import example_from_json, run_focus_directions
from focuslens.io import read_summary, update_run
from focuslens.measure.stats import wilson_interval
from focuslens.viz.compare import relative_depth, topk_depth_overlap
from focuslens.viz.cross_model import plot_direction_norms, plot_head_locations, plot_norm_vs_rank

__all__ = ["FAMILIES", "run_families", "finished_run", "families_summary", "global_layers", "key_bias_profile",
           "all_rows_stage", "ALL_ROWS"]

#: the embedded models compared by default
FAMILIES = ("smollm2-135m-instruct", "gemma3-270m")
_TOP = 20


def global_layers(model) -> list[int]:
    """The layers that attend to the whole prompt when others have a sliding window (Gemma 3:
    5, 11, 17 of 18); empty for a model whose layers all see everything."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    types = list(getattr(config, "layer_types", None) or [])
    return [i for i, t in enumerate(types) if t == "full_attention"] if any(t != "full_attention" for t in types) else []


def _folder(spec: str) -> str:
    return Path(str(spec)).name.replace("/", "_")


def run_families(models: Sequence[str] = FAMILIES, *, settings: DemoSettings | None = None,
                 out_dir: str | Path = "figures/families", release_dir: str | Path | None = None,
                 reuse: dict[str, str | Path] | None = None, quiet: bool = False) -> dict:
    """Run (or reuse) the demo pipeline on every model with one recipe, then compare them
    (module docstring). ``models``: names or folders for
    :func:`~focuslens.model.load.load_model`, or loaded bridges. ``reuse``: model (as named
    in ``models``, or a bridge's ``cfg.model_name``) -> the folder of a finished :func:`run_demo` of these settings on it (e.g.
    ``{"smollm2-135m-instruct": "figures"}``, where ``make reproduce`` writes), read instead
    of run again (:func:`finished_run`). Returns the ``"families"`` summary section."""
    from focuslens.model.load import load_model

    s, out, reuse = settings or DemoSettings(), Path(out_dir), dict(reuse or {})
    known = {m if isinstance(m, str) else str(m.cfg.model_name) for m in models}
    unknown = sorted(set(reuse) - known)
    if unknown:
        raise DataError(f"reuse={unknown}: not among models={list(models)}.")
    runs, marks, biases = {}, {}, []
    for spec in models:
        model = spec if hasattr(spec, "run_with_hooks") else load_model(spec)  # a name, a folder or a loaded bridge
        name = str(model.cfg.model_name)
        marks[name] = global_layers(model)
        key = spec if isinstance(spec, str) else name
        if key in reuse:
            runs[name] = finished_run(reuse[key], model, s)
            if not quiet:
                print(f"{name}: the finished demo run in {reuse[key]}")
        else:  # resumable: the stages an earlier run of these settings saved in its folder are read back
            runs[name] = run_demo(model, settings=s, out_dir=out / _folder(name), release_dir=release_dir, quiet=quiet)
        folder = Path(reuse[key]) if key in reuse else out / _folder(name)  # the model's run folder
        stage = all_rows_stage(model, runs[name], s, folder, quiet=quiet)
        if stage is not None:
            runs[name] = {**runs[name], ALL_ROWS_SECTION: stage}
        biases.append(key_bias_profile(model, runs[name]))
        del model
    released = load_release(release_dir)
    summary = families_summary(runs, marks) | {"settings": asdict(s), "released": sorted(released)}
    table = families_table(summary)
    bias = pd.concat([b for b in biases if b is not None], ignore_index=True) if any(
        b is not None for b in biases) else pd.DataFrame(columns=["model", "part", "mean", "sd", "gold", "alpha", "n_heads"])
    summary["depth_overlap"] = _depth_overlap(runs, load_release(release_dir)).to_dict()
    update_run(out, {"families": summary}, {"families.csv": table.to_csv(index=False),  # one unit
                                            "families_key_bias.csv": bias.to_csv(index=False)})
    draw_families(summary, runs, out, released, marks, bias)
    if not quiet:
        print(table.to_string(index=False))
    return summary


def finished_run(folder: str | Path, model, settings: DemoSettings) -> dict:
    """The stages of a finished :func:`run_demo` in ``folder`` (checked against its manifest),
    refused by name unless it ran ``settings`` (its ``demo_run`` section) on a model of this
    one's shape (its contextual-head scores)."""
    folder = Path(folder)
    saved = read_summary(folder / "summary.json")  # {} when there is none
    if "demo_run" not in saved:
        raise DataError(f"{folder}: no finished demo run (summary.json has no 'demo_run').")
    ran, want = saved["demo_run"].get("settings", {}), json.loads(json.dumps(asdict(settings)))
    for key in sorted(set(ran) | set(want)):
        if ran.get(key) != want.get(key):
            raise DataError(f"{folder}: its demo ran {key}={ran.get(key)!r}, not {want.get(key)!r}.")
    runs = load_results(folder)
    shape = tuple(runs["contextual_heads"]["contextual_heads"].shape)
    if shape != (model.cfg.n_layers, model.cfg.n_heads):
        raise DataError(f"{folder}: its heads are {shape} (layers, heads), not {model.cfg.model_name}'s "
                        f"{(model.cfg.n_layers, model.cfg.n_heads)}.")
    return runs


#: the rows="all" sweep of each model's trained directions (every query row steered, as at
#: inference without a known answer position): one k and a short α grid, as every α is a
#: whole forward pass (the answer-row sweep shares one prefill across its grid)
ALL_ROWS = {"ks": (20,), "alphas": (-0.5, 0.25, 0.5, 1.0, 2.0)}
ALL_ROWS_SECTION = "focus_directions_all_rows"


def all_rows_stage(model, run: dict, settings: DemoSettings, folder: str | Path, *, quiet: bool = False):
    """The demo's trained directions swept with ``rows="all"`` on its own 20-document
    splits (:data:`ALL_ROWS`; (k, α) chosen on validation, tested once), saved in
    ``folder`` as the stage ``focus_directions_all_rows`` and read back when a run of the
    same settings saved it. None when the run has no trained directions."""
    if "focus_directions" not in run or "contextual_heads" not in run:
        return None
    folder = Path(folder)
    identity = json.loads(json.dumps({"demo_settings": asdict(settings), **ALL_ROWS}))
    saved = read_summary(folder / "summary.json")  # {} when there is none
    if saved.get(ALL_ROWS_SECTION, {}).get("identity") == identity:
        return load_stage(folder, ALL_ROWS_SECTION)
    s = settings
    splits = steering_splits(n_train=s.n_train, n_validation=s.n_validation, n_test=s.n_test, seed=s.seed + 4)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    ks = tuple(sorted({min(k, n_heads) for k in ALL_ROWS["ks"]}))  # a tiny model has fewer heads
    stage = run_focus_directions(model, run["contextual_heads"]["contextual_heads"], splits, ks=ks,
                                 alphas=ALL_ROWS["alphas"], refine=(), directions=run["focus_directions"]["focus_directions"],
                                 rows="all", section=ALL_ROWS_SECTION, quiet=quiet)
    stage.summary["identity"] = identity
    stage.save(folder)
    return stage


def key_bias_profile(model, run: dict) -> pd.DataFrame | None:
    """The key bias of a demo run's prompt view (its trained directions' top heads on one
    held-out prompt, the same example for every model) averaged per part of the prompt
    as ``model`` tokenizes it (:func:`~focuslens.directions.artifact.bias_by_part`): one
    row per part, ``mean`` and ``sd`` over the heads, ``gold``; None without a prompt view
    with a key bias."""
    view = run.get("prompt_views")
    if view is None or "key_bias" not in view.tables:
        return None
    prompt = view.objects.get("prompt") or render(example_from_json(view.summary["example"]), model.tokenizer,
                                                  max_length=model.cfg.n_ctx)
    parts = bias_by_part(view.tables["key_bias"], prompt)
    return pd.DataFrame({"model": str(model.cfg.model_name), "part": list(parts.columns),
                         "mean": parts.mean(axis=0).to_numpy(), "sd": parts.std(axis=0, ddof=0).to_numpy(),
                         "gold": [c == parts.attrs["gold"] for c in parts.columns],
                         "alpha": float(view.summary["alpha"]), "n_heads": len(parts)})


def _depth_overlap(runs: dict, released: dict) -> pd.DataFrame:
    """:func:`~focuslens.viz.compare.topk_depth_overlap` of every model's top-20 contextual
    heads and the released rankings."""
    scores = {name: r["contextual_heads"]["contextual_heads"] for name, r in runs.items() if "contextual_heads" in r}
    theirs = {d.model.split("/")[-1]: d for d in released.values()}
    every = scores | theirs
    return topk_depth_overlap(every, k=_TOP) if every else pd.DataFrame()


def _ci(p: float, n: int) -> list[float]:
    return [float(x) for x in wilson_interval(float(p), int(n))]


def families_summary(runs: dict, marks: dict | None = None) -> dict:
    """Per model, from its demo run: distraction accuracy by documents (Wilson CIs), where
    its top-20 contextual heads sit (relative depth; share in global layers), patching
    agreement, split-softmax at τ = 0.1 on its top-k heads vs random k, focus directions'
    validation-chosen cell on test, and the trained directions' ‖d_q‖ on the top heads."""
    out = {}
    for name, r in runs.items():
        cell: dict = {}
        if "distraction" in r:
            d = r["distraction"].summary
            n = int(d["n_prompts"])
            cell["distraction"] = {k: {"accuracy": v, "ci": _ci(v, n), "n": n} for k, v in d["accuracy"].items()}
        if "contextual_heads" in r:
            scores = r["contextual_heads"]["contextual_heads"]
            top = scores.ranking()[:_TOP]
            n_layers, n_heads = scores.shape
            depth = [float(relative_depth(layer, n_layers)) for layer, _ in top]
            glob = (marks or {}).get(name) or []
            cell["heads"] = {"top": [list(h) for h in top], "n_layers": n_layers, "n_heads": n_heads,
                             "relative_depth_median": float(np.median(depth)),
                             "relative_depth_quartiles": [float(q) for q in np.quantile(depth, [0.25, 0.75])],
                             "global_layers": glob,
                             "share_in_global_layers": (sum(layer in glob for layer, _ in top) / len(top)) if glob else None}
        if "patching" in r:
            cell["patching_spearman"] = r["patching"].summary.get("spearman")
        if "split_softmax" in r:
            cell["split_softmax"] = _split_cell(r["split_softmax"].summary)
        if "focus_directions" in r:
            f = r["focus_directions"].summary
            n = int(f["n_test"])
            best = f["best"]
            cell["focus"] = {"k": best["k"], "alpha": best["alpha"], "rows": f.get("rows"), "n_test": n,
                             "baseline": f["baseline_test"], "baseline_ci": _ci(f["baseline_test"], n),
                             "test": best["test_acc"], "test_ci": _ci(best["test_acc"], n),
                             "gain_points": 100 * (best["test_acc"] - f["baseline_test"]),
                             "validation": best["val_acc"], "validation_baseline": best["val_baseline"]}
            if ALL_ROWS_SECTION in r:
                g = r[ALL_ROWS_SECTION].summary
                m, gb = int(g["n_test"]), g["best"]
                cell["focus_all_rows"] = {"k": gb["k"], "alpha": gb["alpha"], "n_test": m,
                                          "baseline": g["baseline_test"], "baseline_ci": _ci(g["baseline_test"], m),
                                          "test": gb["test_acc"], "test_ci": _ci(gb["test_acc"], m),
                                          "gain_points": 100 * (gb["test_acc"] - g["baseline_test"])}
            dirs = r["focus_directions"]["focus_directions"]
            top = dirs.ranking()[:_TOP]
            cell["dq_norm_top_median"] = float(np.median([float(dirs.q[layer, head].float().norm()) for layer, head in top]))
        out[name] = cell
    return {"models": out}


def _split_cell(s: dict) -> dict:
    """Split-softmax at τ = 0.1 (or the smallest τ run) on the top-k heads (k = 20, or the
    largest k run below it) vs random k: accuracy with Wilson CIs (random: the mean over draws)."""
    ks = sorted(int(k) for k in s["contextual"])
    k = str(max([k for k in ks if k <= _TOP] or ks[:1]))
    taus = [t for t in s["contextual"][k] if float(t) < 1.0]  # 1.0 is the unsteered model
    tau = "0.1" if "0.1" in taus else min(taus, key=float)
    n = int(s["n_test"])
    top, rand = s["contextual"][k][tau], s["random"][k][tau]
    return {"k": int(k), "tau": float(tau), "n_test": n, "baseline": s["baseline"], "baseline_ci": _ci(s["baseline"], n),
            "top_k": top, "top_k_ci": _ci(top, n), "random_k": rand, "random_k_ci": _ci(rand, n)}


def families_table(summary: dict) -> pd.DataFrame:
    """One row per model: the headline numbers of :func:`families_summary`."""
    rows = []
    for name, c in summary["models"].items():
        row = {"model": name}
        for n_docs, d in c.get("distraction", {}).items():
            row[f"accuracy_{n_docs}_documents"] = d["accuracy"]
        h = c.get("heads", {})
        row |= {"top20_relative_depth_median": h.get("relative_depth_median"),
                "top20_share_in_global_layers": h.get("share_in_global_layers"),
                "patching_spearman": c.get("patching_spearman")}
        if "split_softmax" in c:
            sp = c["split_softmax"]
            row |= {"split_k": sp["k"], "split_baseline": sp["baseline"], "split_top_k": sp["top_k"],
                    "split_random_k": sp["random_k"]}
        if "focus" in c:
            f = c["focus"]
            row |= {"focus_k": f["k"], "focus_alpha": f["alpha"], "focus_baseline": f["baseline"], "focus_test": f["test"],
                    "focus_gain_points": f["gain_points"], "dq_norm_top_median": c.get("dq_norm_top_median")}
        if "focus_all_rows" in c:
            f = c["focus_all_rows"]
            row |= {"all_rows_k": f["k"], "all_rows_alpha": f["alpha"], "all_rows_test": f["test"],
                    "all_rows_gain_points": f["gain_points"]}
        rows.append(row)
    return pd.DataFrame(rows)


def draw_families(summary: dict, runs: dict, out: Path, released: dict, marks: dict,
                  key_bias: pd.DataFrame | None = None) -> list[Path]:
    """The comparison figures (module docstring)."""
    from focuslens.viz.families import plot_families, plot_family_key_bias
    from focuslens.viz.heads import plot_topk_overlap

    written = _save(plot_families(summary), out, "families")
    scores = {name: r["contextual_heads"]["contextual_heads"] for name, r in runs.items() if "contextual_heads" in r}
    theirs = {d.model.split("/")[-1]: d for d in released.values()}
    written += _save(plot_head_locations({**scores, **theirs}, top_k=_TOP, marked_layers=marks,
                                         title="Contextual heads by relative depth (dashed: Gemma 3's global-attention "
                                               "layers; the others have a 512-token window)"),
                     out, "families_head_locations")
    trained = {name: r["focus_directions"]["focus_directions"] for name, r in runs.items() if "focus_directions" in r}
    every = trained | theirs
    if every:
        written += _save(plot_direction_norms(every), out, "families_direction_norms")
        written += _save(plot_norm_vs_rank(every), out, "families_norm_vs_rank")
    if key_bias is not None and not key_bias.empty:
        written += _save(plot_family_key_bias(key_bias), out, "families_key_bias")
    ranked = {**scores, **theirs}
    if len(ranked) > 1:
        written += _save(plot_topk_overlap(ranked, k=_TOP, by="depth"), out, "families_depth_overlap")
    return written
