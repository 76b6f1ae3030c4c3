"""Where can a label-free key bias help? The focus-conditions grid.

A focus direction adds ``α·d_q`` to a head's queries; the head's logits change by
``b_j = α·d_q·k_j/√d``, the same for every query: a bias on each *key*. A bias can only
prefer the relevant document if that document's keys differ from the others' in a
direction ``d_q`` can read. Two things decide that, and this experiment varies both:

* **layout**: in ``"qa"`` the question comes after the documents, so no document key has
  seen it; in ``"qa_query_aware"`` (Lost-in-the-Middle's query-aware contextualization) it
  also stands before them, so document keys can encode relevance to it;
* **task**: ``"synthetic"`` has 20 confusable documents that each state a city;
  ``"synthetic_answer_free"`` has distractors that never state one, where moving attention
  from the sink onto the context could help by itself.

For every task × layout the directions are trained to convergence on the training split,
heads are ranked four ways (:data:`RANKINGS`), and for each ranking × ``rows`` the (k, α)
is chosen on validation only and measured once on the held-out test prompts: the gain over
the unsteered model with a paired-bootstrap 95 % CI, the same k at negative α, and the
per-prompt magnitude control. :func:`gold_breakdown` shows the mechanism: where inside the
prompt the steered mass lands (gold title, gold answer token, irrelevant documents, sink).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from focuslens.causal.patching import make_counterfactual_pairs, patch_heads
from focuslens.data import make_synthetic_qa
from focuslens.data.lost_in_the_middle import make_nq_distractor_examples
from focuslens.data.render import LAYOUTS, Prompt, render, with_layout
from focuslens.data.splits import gold_positions, steering_splits
from focuslens.directions.cache import collect_attention_inputs
from focuslens.directions.train import train_directions
from focuslens.errors import DataError
from focuslens.io import read_summary, update_run, update_summary
from focuslens.measure.evaluate import evaluate_generation, evaluate_next_token
from focuslens.measure.record import record
from focuslens.measure.scoring import prepare_prompts, score_heads, scores_from_patterns
from focuslens.measure.stats import paired_bootstrap_ci
from focuslens.model.heads import head_mask
from focuslens.steer.focus import MagnitudeControl, best_setting, focus, focus_sweep
from focuslens.viz.steering import plot_focus_conditions

__all__ = ["TASKS", "RANKINGS", "ConditionSettings", "task_splits", "head_rankings", "paired_gain",
           "gold_breakdown", "run_condition", "run_focus_conditions", "run_demo_cell"]

#: task name -> distractor kind of :func:`focuslens.data.make_synthetic_qa`; ``"nq"``: the
#: Lost-in-the-Middle NQ oracle file with BM25 hard negatives (``ConditionSettings.nq_path``)
TASKS = {"synthetic": "confusable", "synthetic_answer_free": "answer_free", "nq": None}
RANKINGS = ("contextual", "chance_corrected", "gold_only", "attribution")


@dataclass
class ConditionSettings:
    """Sizes and knobs of one grid run (defaults: the full run behind the README)."""

    n_train: int = 80
    n_validation: int = 40
    n_test: int = 200
    n_documents: int = 20
    epochs: int = 40
    lr: float = 1e-2
    patience: int = 4
    ks: tuple[int, ...] = (5, 10, 20, 50)
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    all_rows_ks: tuple[int, ...] = (20,)
    all_rows_alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    n_pairs: int = 16
    n_mechanism: int = 20
    n_bootstrap: int = 2000
    seed: int = 7
    rankings: tuple[str, ...] = RANKINGS
    layouts: tuple[str, ...] = ("qa", "qa_query_aware")
    tasks: tuple[str, ...] = ("synthetic", "synthetic_answer_free")  # "nq" needs nq_path
    #: (task, layout) pairs that also run rows="all" (every position re-run per variant)
    all_rows: tuple[tuple[str, str], ...] = (("synthetic", "qa_query_aware"),)
    #: NQ: the oracle ``qa_data`` file, documents per prompt, questions per split, answer length
    nq_path: str | None = None
    nq_documents: int = 10
    nq_questions: tuple[int, int, int] = (40, 20, 20)
    nq_max_new_tokens: int = 16
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every field checked when the settings are made, before any model loads or prompt
        runs (a ``DataError`` naming the field)."""
        for name, allowed in (("tasks", TASKS), ("layouts", [k for k in LAYOUTS if not k.startswith("kv")]),
                              ("rankings", RANKINGS)):
            value = tuple(getattr(self, name))
            bad = [v for v in value if v not in allowed]
            if not value or bad:
                raise DataError(f"{name}={list(value)}: {'unknown ' + repr(bad[0]) if bad else 'empty'}; use some of "
                                f"{sorted(allowed)}.")
        for pair in self.all_rows:
            if len(pair) != 2 or pair[0] not in TASKS or pair[1] not in LAYOUTS:
                raise DataError(f"all_rows: {'/'.join(pair)!r} is not a task/layout pair (e.g. 'synthetic/qa'; tasks "
                                f"{sorted(TASKS)}, layouts {sorted(LAYOUTS)}).")
        sizes = {"n_train": self.n_train, "n_validation": self.n_validation, "n_test": self.n_test,
                 "n_documents": self.n_documents, "epochs": self.epochs}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name}={value!r} must be a positive integer.")
        if "nq" in self.tasks and not self.nq_path:
            raise DataError("tasks include 'nq': set nq_path (--nq) to the Lost-in-the-Middle NQ oracle file.")
        if self.nq_path and not Path(self.nq_path).is_file():
            raise DataError(f"nq_path={self.nq_path!r}: no such file.")
        if not self.ks or not self.alphas:
            raise DataError(f"ks={list(self.ks)} and alphas={list(self.alphas)} must each list at least one value.")


def task_splits(task: str, layout: str, s: ConditionSettings) -> dict[str, list]:
    """Train / validation / test examples, disjoint by question (separate seeds); the test
    questions each appear with the gold at the paper's five positions."""

    if task not in TASKS:
        raise DataError(f"task={task!r}: use one of {sorted(TASKS)}.")
    if task == "nq":
        return _nq_splits(layout, s)
    def make(n, seed):
        return with_layout(make_synthetic_qa(n, n_documents=s.n_documents, seed=seed, distractors=TASKS[task]), layout)

    out = steering_splits(n_train=s.n_train, n_validation=s.n_validation, n_test=s.n_test, n_documents=s.n_documents,
                          seed=s.seed, make=make)
    return {name: out[name] for name in ("train", "validation", "test")}


def _nq_splits(layout: str, s: ConditionSettings) -> dict[str, list]:
    """NQ questions split by question; one gold position per training / validation
    question (cycling), all five for test questions."""

    if not s.nq_path:
        raise DataError("task 'nq' needs ConditionSettings.nq_path (the NQ oracle file; CLI: --nq PATH).")
    positions = gold_positions(s.nq_documents)
    n_train, n_val, n_test = s.nq_questions
    examples = make_nq_distractor_examples(s.nq_path, n_documents=s.nq_documents, gold_positions=positions,
                                           seed=s.seed, limit=n_train + n_val + n_test)
    examples = with_layout(examples, layout)
    by_q: dict[str, list] = {}
    for ex in examples:
        by_q.setdefault(ex.qid, []).append(ex)
    qids = list(by_q)
    one = lambda qs: [by_q[q][i % len(positions)] for i, q in enumerate(qs)]  # noqa: E731
    return {"train": one(qids[:n_train]), "validation": one(qids[n_train : n_train + n_val]),
            "test": [ex for q in qids[n_train + n_val :] for ex in by_q[q]]}


def head_rankings(model, train, names=RANKINGS, *, n_pairs: int = 16, inputs=None,
                  quiet: bool = False) -> dict[str, list]:
    """Four head orders, best first, all from training prompts.

    ``contextual``: attention mass from the answer rows onto the gold document (the paper's).
    ``chance_corrected``: that mass minus the mean mass on one irrelevant document, so a
    head that spreads attention evenly (SmolLM2's layer-0 heads) scores ≈ 0.
    ``gold_only``: the contextual score on the gold-only prompts.
    ``attribution``: attribution patching of every head on counterfactual pairs (the gold
    document names another city): the heads that carry the answer.

    ``inputs``: the training prompts' :class:`~focuslens.directions.train.AttentionInputs` when
    ``train`` are those rendered prompts: the first two rankings then come from its captured
    patterns instead of another forward pass (the same numbers).
    """

    out = {}
    if {"contextual", "chance_corrected"} & set(names):
        if inputs is not None:
            scores = scores_from_patterns(model, train, inputs.pattern)
        else:
            scores = score_heads(model, train, n_bootstrap=0, quiet=quiet)
        n_other = max(1, getattr(train[0], "example", train[0]).n_documents - 1)
        corrected = scores["gold"] - scores["irrelevant_sum"] / n_other
        out["contextual"] = scores.ranking()
        out["chance_corrected"] = _order(corrected)
    examples = [getattr(t, "example", t) for t in train]  # the rest re-render their own prompts
    if "gold_only" in names:
        out["gold_only"] = score_heads(model, examples, setting="gold_only", n_bootstrap=0, quiet=quiet).ranking()
    if "attribution" in names:
        pairs = make_counterfactual_pairs(model, examples[:n_pairs])
        out["attribution"] = patch_heads(model, pairs, methods=("attribution",), quiet=quiet).ranking("attribution")
    return {name: out[name] for name in names}


def _order(values: torch.Tensor) -> list[tuple[int, int]]:
    n_heads = values.shape[1]
    idx = torch.argsort(values.flatten(), descending=True, stable=True).tolist()
    return [(i // n_heads, i % n_heads) for i in idx]


def paired_gain(steered, baseline, *, clusters=None, n_bootstrap: int = 2000,
                seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``steered − baseline`` over the same prompts and its paired-bootstrap 95 % CI
    (``clusters``: one label per prompt, e.g. its question, resampled together)."""
    diff = np.asarray(steered, dtype=float) - np.asarray(baseline, dtype=float)
    if diff.size == 0:
        raise DataError("paired_gain: no prompts.")
    low, high = paired_bootstrap_ci(diff, clusters, n_resamples=n_bootstrap, seed=seed)
    return float(diff.mean()), low, high


def _gold_parts(prompt: Prompt) -> dict:
    """Recorder columns: the gold document's title part (``Document [i](Title: …)``) and its
    answer tokens (key masks), the irrelevant documents and the sink (spans)."""
    T, gold = prompt.n_tokens, prompt.gold
    text, answer, title = prompt.span_text(gold), prompt.example.answers[0], prompt.example.gold.title
    c0 = prompt.char_offsets[gold.start][0]
    title_end = c0 + text.index("(Title: ") + len("(Title: ") + len(title) + 1
    found = text.lower().rfind(answer.lower())
    a0 = c0 + found if found >= 0 else -1  # NQ: the gold passage may word the answer differently
    masks = {name: torch.zeros(T, dtype=torch.bool) for name in ("gold_title", "gold_answer")}
    for j in gold:
        c0, c1 = prompt.char_offsets[j]  # noqa: PLW2901
        masks["gold_title"][j] = c1 <= title_end
        masks["gold_answer"][j] = a0 >= 0 and c1 > a0 and c0 < a0 + len(answer)
    irrelevant = [span for i, span in enumerate(prompt.documents) if i != prompt.gold_index]
    return {**masks, "irrelevant": irrelevant, "sink": prompt.sink}


@torch.no_grad()
def gold_breakdown(model, directions, examples, heads, alpha: float, *, rows: str = "answer") -> pd.DataFrame:
    """Where the steered heads' attention from the answer rows lands, unsteered (α = 0) and
    steered: mean mass on the gold title tokens, the gold answer token(s), all irrelevant
    documents and the sink. One row per (α, part)."""

    mask = head_mask(model, list(heads))
    totals: dict[tuple[float, str], float] = {}
    for ex in examples:
        prompt = render(ex, model.tokenizer)
        for a in (0.0, alpha):
            with (focus(model, directions, alpha=a, heads=mask, rows=rows, prompt=prompt),
                  record(model, mask, _gold_parts, prompt=prompt) as rec, torch.no_grad()):
                model(prompt.input_ids[None].to(model.cfg.device), stop_at_layer=rec.last_layer + 1)  # no logits
            mean = rec.row(0).mean(0)  # over the heads
            for name, value in zip(rec.names, mean.tolist()):
                totals[(a, name)] = totals.get((a, name), 0.0) + value / len(examples)
    return pd.DataFrame([{"alpha": a, "part": name, "mass": v} for (a, name), v in totals.items()])


def _cell(test: pd.DataFrame, val: pd.DataFrame, base: pd.Series, ranking: str, alphas, s: ConditionSettings, *,
          control: bool = True) -> dict:
    """One cell from the sweeps of one ranking: (k, α) chosen on validation, measured on test."""

    v = val[val.ranking == ranking]
    k, a = _choice(val, ranking)
    t = test[(test.ranking == ranking) & (test.k == k)]
    per = lambda alpha: t[t.alpha == alpha].sort_values("example").set_index("example").correct  # noqa: E731
    chosen = per(a)
    gain, lo, hi = paired_gain(chosen, base.loc[chosen.index], n_bootstrap=s.n_bootstrap, seed=s.seed)
    steered = t[t.alpha == a]
    cell = {
        "best": {"k": k, "alpha": a, "val_acc": float(v[(v.k == k) & (v.alpha == a)].correct.mean()),
                 "test_acc": float(chosen.mean())},
        "gain": gain, "gain_ci": [lo, hi],
        "negative_alpha": -a, "negative_alpha_test_acc": float(per(-a).mean()),
        "magnitude_control_test_acc": None, "magnitude_control_gain_ci": None, "magnitude_control_mean_alpha": None,
        "gold_mass": {"before": float(t[t.alpha == 0].gold_mass.mean()), "after": float(steered.gold_mass.mean())},
        "sink_mass": {"before": float(t[t.alpha == 0].sink_mass.mean()), "after": float(steered.sink_mass.mean())},
    }
    if control:
        mc = MagnitudeControl.fit(v, k=k, alpha=a, grid=[x for x in alphas if x > 0], ranking=ranking)
        controlled = mc.apply_to_sweep(t)
        mc_gain = paired_gain(controlled.set_index("example").correct, base.loc[controlled.example],
                              n_bootstrap=s.n_bootstrap, seed=s.seed)
        cell |= {"magnitude_control_test_acc": float(controlled.correct.mean()),
                 "magnitude_control_gain_ci": list(mc_gain[1:]),
                 "magnitude_control_mean_alpha": float(controlled.alpha.mean())}
    return cell


def run_condition(model, task: str, layout: str, s: ConditionSettings, *, quiet: bool = False) -> dict:
    """Every cell of one task × layout: train, rank, sweep validation, test once."""

    t0 = time.perf_counter()
    splits = task_splits(task, layout, s)
    names = tuple(r for r in s.rankings if not (task == "nq" and r == "attribution"))  # pairs are synthetic-only
    # one forward per training / validation prompt serves both the head scores and the training cache
    prompts = {n: prepare_prompts(model, splits[n], quiet=quiet) for n in ("train", "validation")}
    inputs = {n: collect_attention_inputs(model, p, quiet=quiet) for n, p in prompts.items()}
    rankings = head_rankings(model, prompts["train"], names, n_pairs=s.n_pairs, inputs=inputs["train"], quiet=quiet)
    dirs = train_directions(model, prompts["train"], prompts["validation"], epochs=s.epochs, lr=s.lr,
                            patience=s.patience, seed=s.seed, ranking=rankings[names[0]], quiet=quiet,
                            inputs=(inputs["train"], inputs["validation"]),
                            data=f"{task} {layout} n_documents={s.n_documents} seed={s.seed}")
    generate = s.nq_max_new_tokens if task == "nq" else None
    gold_only = _gold_only_accuracy(model, splits["test"], generate)
    cells, sweeps, timing = [], {}, {}
    for rows in ("answer", "all"):
        if rows == "all" and (task, layout) not in s.all_rows:
            continue
        names_r = names if rows == "answer" else names[:1]
        ks = tuple(k for k in (s.ks if rows == "answer" else s.all_rows_ks) if k <= model.cfg.n_layers * model.cfg.n_heads)
        alphas = s.alphas if rows == "answer" else s.all_rows_alphas
        t1 = time.perf_counter()
        val = focus_sweep(model, dirs, splits["validation"], ks=ks, alphas=alphas, rows=rows,
                          rankings={n: rankings[n] for n in names_r}, max_new_tokens=generate, quiet=quiet)
        chosen = {n: _choice(val, n) for n in names_r}
        # rows="all" re-runs every position per variant: test only the chosen ±α (no
        # per-prompt magnitude control, which needs every α of the grid on each prompt)
        grid = alphas if rows == "answer" else [a for _, a in chosen.values()]
        test_alphas = sorted({*grid, *(-a for _, a in chosen.values())})
        test = focus_sweep(model, dirs, splits["test"], ks={n: (k,) for n, (k, _) in chosen.items()},
                           alphas=test_alphas, rows=rows, rankings={n: rankings[n] for n in names_r},
                           max_new_tokens=generate, quiet=quiet)
        timing[rows] = time.perf_counter() - t1
        base = test[(test.ranking == names_r[0]) & (test.alpha == 0)].drop_duplicates("example")
        base = base.set_index("example").correct
        for name in names_r:
            cell = {"task": task, "layout": layout, "ranking": name, "rows": rows,
                    "n_test": int(test.example.nunique()), "n_validation": int(val.example.nunique()),
                    "baseline": float(base.mean()), "gold_only": gold_only,
                    "metric": "best_subspan_em (greedy)" if generate else "top-1 next-token accuracy"}
            cells.append(cell | _cell(test, val, base, name, alphas, s, control=rows == "answer"))
        sweeps[rows] = (val, test)
    k, a = cells[0]["best"]["k"], cells[0]["best"]["alpha"]
    mechanism = gold_breakdown(model, dirs, splits["test"][: s.n_mechanism], rankings[names[0]][:k], a)
    meta = dirs.metadata
    return {"cells": cells, "sweeps": sweeps, "mechanism": mechanism.assign(task=task, layout=layout),
            "directions": {"epochs_run": meta["epochs_run"], "train_seconds": meta["train_seconds"],
                           "cache_seconds": meta["cache_seconds"],
                           "val_gold_mass_before": float(np.mean(meta["val_gold_mass_before"])),
                           "val_gold_mass_after": float(np.mean(meta["val_gold_mass_after"])),
                           "history": meta["history"], "norms": dirs.norm_summary(top_k=20)},
            "seconds": time.perf_counter() - t0, "sweep_seconds": timing}


def _gold_only_accuracy(model, test, generate: int | None) -> float:
    """Accuracy with the gold document alone, once per distinct test question."""

    unique = list({(ex.documents[ex.gold_index], ex.question): ex.gold_only() for ex in test}.values())
    if generate:
        return float(evaluate_generation(model, unique, max_new_tokens=generate, quiet=True).correct.mean())
    return float(evaluate_next_token(model, unique, quiet=True).correct.mean())


def _choice(val: pd.DataFrame, ranking: str) -> tuple[int, float]:

    v = val[(val.ranking == ranking) & (val.alpha > 0)]
    best = best_setting(v)
    return int(best["k"]), float(best["alpha"])


def run_focus_conditions(model, settings: ConditionSettings | None = None, *, out_dir=None,
                         quiet: bool = False) -> dict:
    """The whole grid: one :func:`run_condition` per task × layout. Returns ``cells`` (a
    DataFrame, one row per task × layout × ranking × rows), ``mechanism`` and the raw
    results; with ``out_dir`` writes ``focus_conditions.{csv,png,html}`` and the
    ``"focus_conditions"`` section of ``summary.json``."""
    s = settings or ConditionSettings()
    t0 = time.perf_counter()
    saved = read_summary(Path(out_dir) / "summary.json") if out_dir is not None else {}  # a broken one: now
    results = {}
    for task in s.tasks:
        for layout in s.layouts:
            if _done(saved, task, layout, s):
                print(f"{task}/{layout}: already in {Path(out_dir) / 'summary.json'} with these settings; kept "
                      "(another --out, or delete it, to run it again)", flush=True)
                continue
            results[(task, layout)] = r = run_condition(model, task, layout, s, quiet=quiet)
            if out_dir is not None:  # each pair saved as it finishes: a failure later keeps it
                write_focus_conditions({"cells": pd.DataFrame(r["cells"]), "mechanism": r["mechanism"],
                                        "results": {(task, layout): r}}, s, Path(out_dir))
            for c in r["cells"]:
                print(f"{task:>22} {layout:>15} {c['ranking']:>17} {c['rows']:>6}: baseline {c['baseline']:.3f} "
                      f"-> {c['best']['test_acc']:.3f} (k={c['best']['k']}, a={c['best']['alpha']:g}) gain "
                      f"{100 * c['gain']:+.1f} [{100 * c['gain_ci'][0]:+.1f}, {100 * c['gain_ci'][1]:+.1f}] pts; "
                      f"a<0 {c['negative_alpha_test_acc']:.3f}; control {_fmt(c['magnitude_control_test_acc'])}",
                      flush=True)
    kept = {(t, lay) for t in s.tasks for lay in s.layouts} - set(results)  # from an earlier run, as saved
    cells = pd.DataFrame([c for r in results.values() for c in r["cells"]]
                         + [c for c in saved.get("focus_conditions", []) if (c["task"], c["layout"]) in kept])
    mechanism = pd.concat([*(r["mechanism"] for r in results.values()), pd.DataFrame(
        [m for m in saved.get("focus_conditions_run", {}).get("mechanism", []) if (m["task"], m["layout"]) in kept])],
        ignore_index=True)
    return {"cells": cells, "mechanism": mechanism, "results": results, "seconds": time.perf_counter() - t0}


def _settings_record(s: ConditionSettings) -> dict:
    """The settings a grid run records per task/layout pair (what a resumed run must match)."""
    return json.loads(json.dumps({k: v for k, v in asdict(s).items() if k != "extra"}))


def _done(saved: dict, task: str, layout: str, s: ConditionSettings) -> bool:
    """Whether ``summary.json`` already holds this pair, run with the same settings (the
    grid's other pairs aside: a run may add tasks or layouts)."""
    run = saved.get("focus_conditions_run", {}).get("runs", {}).get(f"{task}/{layout}")
    if not run or not isinstance(run.get("settings"), dict):
        return False

    def own(record: dict) -> dict:
        pairs = {tuple(p) for p in record.get("all_rows", [])}
        return {k: v for k, v in record.items() if k not in ("tasks", "layouts", "all_rows")} | {
            "rows_all": (task, layout) in pairs}

    return own(run["settings"]) == own(_settings_record(s))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_focus_conditions(out: dict, s: ConditionSettings, out_dir) -> None:
    """CSV, figure and the ``summary.json`` sections of a grid run."""


    out_dir.mkdir(parents=True, exist_ok=True)
    summary_file = out_dir / "summary.json"
    old = read_summary(summary_file)
    # a run of some task x layout pairs replaces those pairs' cells and keeps the others'
    done = {(t, lay) for t, lay in out["results"]}
    keep = lambda rows: [r for r in rows if (r["task"], r["layout"]) not in done]  # noqa: E731
    cells = pd.concat([pd.DataFrame(keep(old.get("focus_conditions", []))), out["cells"]], ignore_index=True)
    run = old.get("focus_conditions_run", {})
    mechanism = pd.concat([pd.DataFrame(keep(run.get("mechanism", []))), out["mechanism"]], ignore_index=True)
    earlier = run.get("runs") or run.get("per_condition", {})  # "per_condition": the first format
    runs = {k: v for k, v in earlier.items() if tuple(k.split("/")) not in done}
    settings = _settings_record(s)
    for (t, lay), r in out["results"].items():
        runs[f"{t}/{lay}"] = {"seconds": r["seconds"], "sweep_seconds": r["sweep_seconds"], "settings": settings,
                              "directions": {k: v for k, v in r["directions"].items() if k != "history"}}
    records = cells.astype(object).where(cells.notna(), None).to_dict("records")  # not-run fields: null, not NaN
    update_run(out_dir, {"focus_conditions": records,
                         "focus_conditions_run": {"mechanism": mechanism.to_dict("records"), "runs": runs}},
               {"focus_conditions.csv": pd.json_normalize(cells.to_dict("records")).to_csv(index=False)})
    plot_focus_conditions(cells, mechanism).save(out_dir / "focus_conditions")


def run_demo_cell(model, *, n_train: int = 40, n_validation: int = 20, n_test: int = 100,
                  out_dir: str | Path = "figures", quiet: bool = False) -> dict:
    """One cell of ``focuslens experiment focus`` at a small size: synthetic task,
    query-aware layout, contextual ranking, answer rows (the full grid: ``make
    focus-conditions``). Its numbers go to ``summary.json["focus_conditions_demo"]``."""

    s = ConditionSettings(n_train=n_train, n_validation=n_validation, n_test=n_test, epochs=40, rankings=("contextual",),
                          layouts=("qa_query_aware",), tasks=("synthetic",), all_rows=(), n_mechanism=10)
    cell = run_condition(model, "synthetic", "qa_query_aware", s, quiet=quiet)["cells"][0]
    print(f"\nFocus directions, one cell of the conditions grid (synthetic, query-aware, contextual heads, answer "
          f"rows; {cell['n_test']} test prompts): unsteered {cell['baseline']:.3f} -> {cell['best']['test_acc']:.3f} "
          f"(k={cell['best']['k']}, alpha={cell['best']['alpha']:g}); gain {100 * cell['gain']:+.1f} points, 95% CI "
          f"[{100 * cell['gain_ci'][0]:+.1f}, {100 * cell['gain_ci'][1]:+.1f}]")
    update_summary(Path(out_dir) / "summary.json", "focus_conditions_demo", cell)
    return cell
