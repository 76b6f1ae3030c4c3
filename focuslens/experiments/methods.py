"""The field's methods side by side: head scores and attention interventions on the same
prompts, with the same statistics (``focuslens experiment methods``, ``make methods``).

**Head rankings.** Every score of :data:`~focuslens.measure.head_scores.SCORES` (the paper's
contextual score, retrieval, QRHead, CoRe-style contrastive, ICR-calibrated, and the causal
effect by attribution patching) on the same prompts (:func:`~focuslens.measure.head_scores.rank_heads_by`:
one forward per prompt and input serves them all). Compared by top-k overlap and Spearman
correlation, pairwise and with the causal effect (synthetic prompts only: the
counterfactual pairs need the synthetic answer format), and drawn as head-location maps on
one colour scale.

**Interventions.** Every class of :data:`~focuslens.model.intervention.METHODS` — with the
label (split-softmax, PASTA, SpotLight) and without (focus directions, Ms-PoE, positional
calibration, AttnRank) — on the same test prompts as the focus experiments:

* ``synthetic``: the demo's steering splits (20 documents; the test questions at five gold
  positions), the contextual ranking and focus directions of a finished demo run
  (``--run``, default SmolLM2's in ``figures/families``), scored by next-token accuracy;
* ``nq``: the NQ experiment's questions (10 documents; its test questions, one prompt each
  with the gold first / middle / last in turn), the directions trained there and their
  ranking (``figures/nq_directions``), scored by the teacher-forced log-probability of the
  gold answer.

Each method's setting (its ``candidates``) is chosen on validation prompts, then tested
once; every test prompt runs unsteered and steered, and the gain gets a paired bootstrap CI
clustered by question. Labelled methods act on the top k (20) heads of the same ranking.
Every prompt's candidates (one batch row each where a method's candidates stack) and the
test's unsteered and steered runs share one prefill of the prompt when they act at the answer
rows (``nq``: every method but Ms-PoE, which re-rotates every position, as in the NQ
experiment); on ``synthetic`` they act at every row, as the paper does. The run is resumable
piece by piece (:class:`~focuslens.experiments.pieces.Pieces`: two processes started with
the same command share the pieces).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from focuslens.causal.patching import rank_agreement
from focuslens.data.splits import nq_splits, steering_splits
from focuslens.data.synthetic import make_synthetic_qa
from focuslens.directions.artifact import FocusDirections
from focuslens.errors import DataError
from focuslens.experiments.pieces import Pieces
from focuslens.io import update_run
from focuslens.measure.evaluate import evaluate_next_token, evaluate_variants, gold_logprob_variants
from focuslens.measure.head_scores import SCORES, rank_heads_by
from focuslens.measure.scoring import HeadScores, score_heads
from focuslens.measure.stats import paired_bootstrap_ci, wilson_interval
from focuslens.model.heads import per_variant
from focuslens.model.intervention import METHODS, HeadIntervention
from focuslens.model.load import model_id
from focuslens.model.prefix import PrefillStore
from focuslens.steer.context import MethodContext

__all__ = ["MethodsSettings", "run_methods", "run_from_args", "DATASETS", "methods_table"]

DATASETS = ("synthetic", "nq")
#: the primary metric of each dataset (higher is better) and its unit in tables
METRIC = {"synthetic": ("correct", "accuracy"), "nq": ("gold_logprob", "nats")}


@dataclass
class MethodsSettings:
    """Sizes and sources of the methods comparison (defaults: the run behind the README)."""

    run: str = "figures/families/smollm2-135m-instruct"
    nq_path: str = ""
    nq_directions: str = "figures/nq_directions"
    datasets: tuple[str, ...] = DATASETS
    methods: tuple[str, ...] = ()  # default: every registered intervention
    scores: tuple[str, ...] = ()  # default: every registered head score
    n_rank: int = 100
    n_validation: int = 100
    n_test: int = 200
    n_calibration: int = 50
    k: int = 20
    seed: int = 0
    nq_seed: int = 7  # the NQ experiment's split seed (``make nq-focus``): the same questions
    n_bootstrap: int = 2000
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [d for d in self.datasets if d not in DATASETS]
        if bad:
            raise DataError(f"datasets={list(self.datasets)}: choose from {DATASETS}.")
        if "nq" in self.datasets and (not self.nq_path or not Path(self.nq_path).is_file()):
            raise DataError(f"nq_path={self.nq_path!r}: dataset 'nq' needs the Lost-in-the-Middle NQ oracle file.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise DataError(f"methods={unknown}: not registered; known: {sorted(METHODS)}.")
        unknown = [s for s in self.scores if s not in SCORES]
        if unknown:
            raise DataError(f"scores={unknown}: not registered; known: {sorted(SCORES)}.")
        for name in ("n_rank", "n_validation", "n_test", "n_calibration", "k", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name}={value!r} must be a positive integer.")

    def record(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ------------------------------------------------------------------ data of each dataset
def _synthetic(model, s: MethodsSettings) -> dict:
    """The demo's steering splits and a finished run's ranking and directions."""
    n_test = s.n_test - s.n_test % 5 or 5
    splits = steering_splits(n_train=s.n_calibration, n_validation=s.n_validation, n_test=n_test, seed=s.seed + 4)
    run = Path(s.run)
    rank_examples = make_synthetic_qa(s.n_rank, n_documents=20, seed=s.seed + 1)
    if (run / "contextual_heads.json").is_file():
        ranking = HeadScores.load(run / "contextual_heads.json", model=model)
    else:
        ranking = score_heads(model, rank_examples, n_bootstrap=0, quiet=True, data="synthetic, methods")
    directions = FocusDirections.load(run / "focus_directions", model=model) if (run / "focus_directions").is_dir() \
        else None
    return {"validation": splits["validation"], "test": splits["test"], "calibration": splits["train"],
            "rank": rank_examples, "ranking": ranking, "directions": directions,
            "source": {"ranking": str(run / "contextual_heads.json") if (run / "contextual_heads.json").is_file()
                       else "scored now", "directions": str(run / "focus_directions") if directions else None}}


def _nq(model, s: MethodsSettings) -> dict:
    """The NQ experiment's questions (same split seed and sizes), one test prompt per question
    with the gold first / middle / last in turn, and its directions (their ranking)."""
    splits = nq_splits(s.nq_path, n_train=1000, n_validation=150, n_test=300, n_documents=10, test_documents=(10,),
                       seed=s.nq_seed)
    tests = splits["test"][10]  # per question: gold first, middle, last
    n_q = len(tests) // 3
    test = [tests[3 * i + i % 3] for i in range(min(s.n_test, n_q))]
    path = Path(s.nq_directions)
    directions = FocusDirections.load(path, model=model) if path.is_dir() else None
    ranking = directions if directions is not None else score_heads(
        model, splits["train"][: s.n_rank], n_bootstrap=0, quiet=True, data="NQ train, methods")
    return {"validation": splits["validation"][: s.n_validation], "test": test,
            "calibration": splits["train"][: s.n_calibration], "rank": splits["train"][: s.n_rank],
            "ranking": ranking, "directions": directions,
            "source": {"ranking": f"{path} (the NQ experiment's training ranking)" if directions else "scored now",
                       "directions": str(path) if directions else None}}


# ------------------------------------------------------------------ measuring
def _scored(model, dataset: str, examples, intervention=None, prefills=None) -> pd.DataFrame:
    """One row per (example, variant): ``example``, ``variant``, ``qid``, ``position`` and the
    dataset's metric (``prefills`` shared by every answer-row intervention of a piece)."""
    if dataset == "synthetic":
        if intervention is None:
            df = evaluate_next_token(model, examples, quiet=True).reset_index(names="example").assign(variant=0)
        else:
            df = evaluate_variants(model, examples, intervention, prefills=prefills, quiet=True)
        return df[["example", "variant", "qid", "position", "correct", "gold_logit"]].assign(
            correct=lambda d: d.correct.astype(float))
    df = gold_logprob_variants(model, examples, intervention, prefills=prefills, quiet=True)  # None: unsteered
    return df[["example", "variant", "qid", "position", "gold_logprob"]]


def stack_candidates(model, values: list):
    """The candidate values of one method as one value holding them as variants (one batch
    row each, one prefill per prompt), or None when they cannot be stacked (different
    classes, or fields other than heads / ranking / strength that differ)."""
    first = values[0]
    if len(values) == 1 or not isinstance(first, HeadIntervention) or not dataclasses.is_dataclass(first):
        return None
    free = {"heads", "ranking", first.STRENGTH}
    for v in values[1:]:
        if type(v) is not type(first):
            return None
        for f in dataclasses.fields(first):
            a, b = getattr(first, f.name), getattr(v, f.name)
            if f.name not in free and a is not b and not (isinstance(a, (str, int, float, bool)) and a == b):
                return None
    masks = torch.cat([v.head_masks(model) for v in values])
    strength = torch.cat([per_variant(getattr(v, v.STRENGTH), 1, v.STRENGTH) for v in values])
    return dataclasses.replace(first, heads=masks, ranking=None, **{first.STRENGTH: strength})


def _candidates(model, dataset: str, data: dict, s: MethodsSettings, work: Path, methods: list[str]) -> dict:
    """Each method's candidate ``(setting, value)`` pairs (empty: skipped)."""
    context = MethodContext(model, ranking=data["ranking"], k=s.k, directions=data["directions"],
                            calibration=data["calibration"], rows=data["rows"], seed=s.seed,
                            cache_dir=work / dataset)
    return {name: METHODS[name].candidates(context) for name in methods}


def _validation_piece(model, dataset: str, candidates: dict):
    def fn(examples, start):
        store, out = PrefillStore(), []
        for name, cands in candidates.items():
            if not cands:
                continue
            stacked = stack_candidates(model, [iv for _, iv in cands])
            runs = [(stacked, None)] if stacked is not None else [(iv, i) for i, (_, iv) in enumerate(cands)]
            for iv, index in runs:
                df = _scored(model, dataset, examples, iv, prefills=store)
                df["candidate"] = df.variant if index is None else index
                out.append(df.assign(method=name, example=df.example + start))
        store.clear()
        return pd.concat(out, ignore_index=True)

    return fn


def _test_piece(model, dataset: str, chosen: dict):
    def fn(examples, start):
        store = PrefillStore()
        out = [_scored(model, dataset, examples, prefills=store).assign(method="unsteered")]
        out += [_scored(model, dataset, examples, iv, prefills=store).assign(method=name) for name, iv in chosen.items()]
        store.clear()
        return pd.concat(out, ignore_index=True).assign(example=lambda d: d.example + start)

    return fn


def _choose(val: pd.DataFrame, candidates: dict, dataset: str) -> tuple[dict, dict]:
    """Each method's best candidate on validation (the primary metric's mean, then the gold
    logit's) and its validation grid."""
    metric = METRIC[dataset][0]
    chosen, grids = {}, {}
    for name, cands in candidates.items():
        if not cands:
            continue
        g = val[val.method == name].groupby("candidate")
        means = g[metric].mean()
        tie = g["gold_logit"].mean() if "gold_logit" in val else means * 0
        best = max(means.index, key=lambda c: (means[c], tie[c]))
        chosen[name] = int(best)
        grids[name] = [{"setting": cands[int(c)][0], "value": float(means[c])} for c in means.index]
    return chosen, grids


def _gain_row(dataset: str, name: str, test: pd.DataFrame, grid: list, setting: dict, s: MethodsSettings) -> dict:
    """The test gain of one method over the unsteered model, paired, clustered by question."""
    metric, unit = METRIC[dataset]
    steered = test[test.method == name].sort_values("example")
    base = test[test.method == "unsteered"].sort_values("example")
    if list(steered.qid) != list(base.qid):
        raise DataError(f"{dataset}/{name}: test rows do not pair with the unsteered rows.")
    diff = steered[metric].to_numpy() - base[metric].to_numpy()
    low, high = paired_bootstrap_ci(diff, clusters=steered.qid.to_numpy(), n_resamples=s.n_bootstrap, seed=s.seed)
    cls = METHODS[name]
    row = {"dataset": dataset, "method": name, "needs_label": cls.NEEDS_LABEL, "setting": json.dumps(setting),
           "metric": metric, "unit": unit, "baseline": float(base[metric].mean()), "value": float(steered[metric].mean()),
           "gain": float(diff.mean()), "gain_low": low, "gain_high": high, "n_test": len(steered),
           "n_questions": int(steered.qid.nunique()), "validation_value": max(g["value"] for g in grid)}
    if metric == "correct":
        row["value_low"], row["value_high"] = wilson_interval(row["value"], len(steered))
    return row


def _identity(s: MethodsSettings) -> dict:
    """The settings a piece's results depend on (which datasets, methods and scores run is
    said per piece folder; where the NQ file lies is not a setting)."""
    return {k: v for k, v in s.record().items() if k not in ("datasets", "methods", "scores", "nq_path")}


# ------------------------------------------------------------------ rankings
def _rankings(model, dataset: str, data: dict, s: MethodsSettings, work: Path, quiet: bool) -> tuple[HeadScores, list]:
    """Every head score on the dataset's ranking prompts (resumable pieces of prompts, each
    piece's mean weighted by its size), and their pairwise agreement."""
    names = [n for n in (s.scores or sorted(SCORES, key=lambda n: (SCORES[n].ORDER, n)))
             if dataset == "synthetic" or n != "causal"]

    def fn(examples, start):
        ranks = rank_heads_by(model, examples, names, n_bootstrap=0, quiet=True)
        return ranks.to_dataframe()[["layer", "head", "metric", "value"]].assign(n=len(examples))

    identity = {"settings": _identity(s), "model": model_id(model), "scores": names, "dataset": dataset}
    rows = Pieces(work / dataset / "heads", identity, size=10).run(data["rank"], fn, desc=f"{dataset}: head scores",
                                                                   quiet=quiet)
    rows["weighted"] = rows.value * rows.n
    means = rows.groupby(["metric", "layer", "head"]).weighted.sum() / rows.groupby(["metric", "layer", "head"]).n.sum()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    mean = {m: torch.tensor(means[m].to_numpy(dtype="float32").reshape(L, H)) for m in names}
    ranks = HeadScores(mean=mean, metadata={"model": model_id(model), "data": f"{dataset}, methods",
                                            "n_examples": len(data["rank"]),
                                            "scores": {n: {"paper": SCORES[n].paper,
                                                           "needs_label": SCORES[n].needs_label} for n in names}})
    agreement = [{"dataset": dataset, "score_a": a, "score_b": b, **rank_agreement((ranks, a), (ranks, b), k=s.k)}
                 for i, a in enumerate(names) for b in names[i + 1:]]
    return ranks, agreement


# ------------------------------------------------------------------ the run
def run_methods(model, settings: MethodsSettings | None = None, *, out_dir: str | Path = "figures",
                quiet: bool = False) -> dict:
    """Run the comparison (module docstring) into ``out_dir``: ``methods_rankings.csv``,
    ``methods_interventions.csv``, ``methods_heads_<dataset>.{png,html}``,
    ``methods_interventions.{png,html}`` and the ``"methods"`` section of ``summary.json``.
    Resumable pieces live under ``out_dir/methods_work`` (delete it to start over); two
    processes started with the same command share them."""
    from focuslens.viz.methods import plot_method_gains, plot_score_maps

    s = settings or MethodsSettings()
    out = Path(out_dir)
    work = out / "methods_work"
    t0 = time.perf_counter()
    methods = list(s.methods or sorted(METHODS, key=lambda m: (METHODS[m].NEEDS_LABEL, m)))
    rank_rows, gain_rows, skipped, heads, choices = [], [], {}, {}, {}
    for dataset in s.datasets:
        data = _synthetic(model, s) if dataset == "synthetic" else _nq(model, s)
        data["rows"] = "all" if dataset == "synthetic" else "answer"
        ranks, rows = _rankings(model, dataset, data, s, work, quiet)
        heads[dataset], rank_rows = ranks, rank_rows + rows
        candidates = _candidates(model, dataset, data, s, work, methods)
        skipped[dataset] = {n: "no candidate settings (no trained directions for this dataset)"
                            for n, c in candidates.items() if not c}
        identity = {"settings": _identity(s), "model": model_id(model), "dataset": dataset, "methods": methods,
                    "candidates": {n: [c[0] for c in cands] for n, cands in candidates.items()}}
        val = Pieces(work / dataset / "validation", identity, size=10).run(
            data["validation"], _validation_piece(model, dataset, candidates), desc=f"{dataset}: validation",
            quiet=quiet)
        chosen, grids = _choose(val, candidates, dataset)
        values = {n: candidates[n][c][1] for n, c in chosen.items()}
        test = Pieces(work / dataset / "test", identity | {"chosen": chosen}, size=10).run(
            data["test"], _test_piece(model, dataset, values), desc=f"{dataset}: test", quiet=quiet)
        for name, c in chosen.items():
            gain_rows.append(_gain_row(dataset, name, test, grids[name], candidates[name][c][0], s))
        choices[dataset] = {"grids": grids, **data["source"], "rows": data["rows"], "n_test": len(data["test"]),
                            "n_validation": len(data["validation"]), "n_rank": len(data["rank"]),
                            "n_calibration": len(data["calibration"])}
    rankings, table = pd.DataFrame(rank_rows), pd.DataFrame(gain_rows)
    files = {"methods_rankings.csv": rankings.to_csv(index=False), "methods_interventions.csv": table.to_csv(index=False)}
    summary = _summary(model, s, rankings, table, heads, choices, skipped, time.perf_counter() - t0)
    update_run(out, {"methods": summary}, files)
    for dataset, ranks in heads.items():
        plot_score_maps(ranks, title=f"Head scores of {model_id(model)} on {dataset} prompts "
                                     f"({ranks.metadata.get('n_examples')} prompts)").save(out / f"methods_heads_{dataset}")
    if len(table):
        plot_method_gains(table).save(out / "methods_interventions")
    if not quiet:
        print(methods_table(table))
    return summary


def _summary(model, s, rankings: pd.DataFrame, table: pd.DataFrame, heads: dict, choices: dict, skipped: dict,
             seconds: float) -> dict:
    top = {d: {m: [list(h) for h in r.ranking(m)[:5]] for m in r.metrics} for d, r in heads.items()}
    return {"model": model_id(model), "settings": s.record(), "rankings": rankings.to_dict("records"),
            "top_heads": top, "interventions": table.to_dict("records"), "choices": choices, "skipped": skipped,
            "seconds_this_invocation": round(seconds, 1)}


def methods_table(table: pd.DataFrame) -> str:
    """The intervention table as Markdown (the README's)."""
    if table.empty:
        return "(no interventions measured)"
    lines = ["| dataset | method | label | chosen setting | unsteered | steered | gain [95% CI] | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        scale, fmt = (100, "{:+.1f} pts") if r.metric == "correct" else (1, "{:+.2f}")
        lines.append(f"| {r.dataset} | {r.method} | {'yes' if r.needs_label else 'no'} | {r.setting} | "
                     f"{r.baseline * scale:.3g} | {r.value * scale:.3g} | "
                     f"{fmt.format(r.gain * scale)} [{r.gain_low * scale:+.2f}, {r.gain_high * scale:+.2f}] | "
                     f"{r.n_test} ({r.n_questions} q) |")
    return "\n".join(lines)


def run_from_args(args) -> None:
    """``focuslens experiment methods`` (the CLI's arguments)."""
    from focuslens.model.load import load_model

    out = "figures" if args.out == "runs/focus_conditions" else args.out
    settings = MethodsSettings(run=args.run, nq_path=args.nq or "", nq_directions=args.nq_directions,
                               datasets=tuple(args.datasets), methods=tuple(args.methods or ()),
                               scores=tuple(args.head_scores or ()), n_rank=args.n_rank,
                               n_validation=100 if args.n_validation is None else args.n_validation,
                               n_test=args.n_test, n_calibration=args.n_calibration, k=args.k,
                               seed=0 if args.seed is None else args.seed)
    run_methods(load_model(args.model), settings, out_dir=out, quiet=args.quiet)
    print(f"{out}/methods_interventions.{{csv,png,html}}, methods_rankings.csv, methods_heads_*.png and summary.json")
