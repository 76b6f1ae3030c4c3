"""The end-to-end pipeline behind ``make demo`` / ``focuslens demo``.

:func:`run_demo` runs the stages of :mod:`focuslens.experiments.stages` in order, handing each one's
results to the next in memory: the contextual scores to patching and steering, the test
prompts' prefills from the split-softmax sweep to the focus-direction sweep, the trained
directions to the prompt views. Each stage is saved under ``out_dir`` as it finishes (its
``summary.json`` section, CSVs, artifacts); the figures are drawn at the end from the
results in memory (:func:`focuslens.experiments.figures.draw_all`). :func:`load_results` reads a saved
run back, for ``make figures``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from focuslens.data.splits import steering_splits
from focuslens.directions.artifact import import_release
from focuslens.experiments.conditions import run_demo_cell
from focuslens.experiments.figures import draw_all
from focuslens.experiments.stages import (
    StageResult,
    load_stage,
    run_contextual_heads,
    run_distraction,
    run_focus_directions,
    run_patching,
    run_prompt_views,
    run_split_softmax,
)
from focuslens.io import RUN, check_unit, has_manifest, read_summary, update_summary
from focuslens.measure.evaluate import reference_accuracies
from focuslens.measure.stats import wilson_interval
from focuslens.model.load import load_model
from focuslens.model.prefix import PrefillStore

__all__ = ["DemoSettings", "run_demo", "load_results", "load_release", "update_summary", "STAGES"]

#: the sections :func:`run_demo` writes, in order
STAGES = ("distraction", "contextual_heads", "patching", "split_softmax", "focus_directions",
          "focus_directions_5_documents", "prompt_views")


@dataclass
class DemoSettings:
    """Sizes of one demo run (defaults: the full run behind the README's numbers)."""

    seed: int = 0
    n_prompts: int = 100          # distraction rows and contextual scoring
    n_settings: int = 50          # prompts scored again under each extra scoring setting
    n_pairs: int = 8              # counterfactual pairs for patching
    n_candidates: int = 20        # top contextual heads (+ as many random) patched exactly
    n_ablation: int = 16          # prompts for group ablation
    ablation_ks: tuple = (5, 10, 20)
    n_train: int = 200
    n_validation: int = 100
    n_test: int = 200
    split_ks: tuple = (1, 5, 10, 20, 50)
    taus: tuple = (0.8, 0.5, 0.3, 0.1)
    n_random: int = 3
    focus_ks: tuple = (1, 5, 10, 20, 50, None)
    alphas: tuple = (-0.5, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 2.0)
    refine: tuple = (0.6, 0.8, 1.25, 1.5)
    training: dict = field(default_factory=dict)  # train_directions arguments (epochs, lr, ...)
    demo_cell: bool = True        # one cell of `focuslens experiment focus`
    demo_cell_sizes: tuple = (40, 20, 100)  # its train / validation / test prompts

    @classmethod
    def quick(cls) -> DemoSettings:
        """Every stage at a reduced size: the ``make demo`` run (minutes on 2 CPU cores)."""
        return _quick()


def _quick() -> DemoSettings:
    # sized to finish in < 10 min on 2 CPU cores (each stage's seconds go to summary.json["demo_run"])
    return DemoSettings(n_prompts=20, n_settings=10, n_pairs=4, n_candidates=10, n_ablation=8, n_train=30,
                        n_validation=15, n_test=40, split_ks=(1, 5, 20), taus=(0.5, 0.1), n_random=2,
                        focus_ks=(5, 20, None), alphas=(-0.5, 0.25, 0.5, 1.0, 2.0), refine=(0.8, 1.25),
                        training={"epochs": 20, "lr": 1e-2}, demo_cell_sizes=(20, 10, 40))


def load_release(release_dir: str | Path | None) -> dict:
    """The paper's released directions under ``release_dir``: folder name ->
    :class:`~focuslens.directions.artifact.FocusDirections` (empty when the folder is absent)."""

    if not release_dir or not Path(release_dir).is_dir():
        return {}
    return {p.name: import_release(p) for p in sorted(Path(release_dir).iterdir(), key=lambda p: p.name.lower())
            if p.is_dir()}


def load_results(out_dir: str | Path = "figures") -> dict[str, StageResult]:
    """Every stage saved under ``out_dir`` by :func:`run_demo` (those present), after the
    whole folder is checked against its manifest (a ``DataError`` names the first file that
    is missing, cut or changed)."""

    if has_manifest(out_dir):
        check_unit(out_dir, kind=RUN)
    saved = read_summary(Path(out_dir) / "summary.json")
    return {section: load_stage(out_dir, section) for section in STAGES if section in saved}


def run_demo(model_spec: str = "smollm2-135m-instruct", *, settings: DemoSettings | None = None,
             out_dir: str | Path = "figures", release_dir: str | Path | None = None,
             quiet: bool = False) -> dict[str, StageResult]:
    """Load the model (or take a loaded bridge), run every stage, save it, draw the
    figures; returns the stages (section -> :class:`~focuslens.experiments.stages.StageResult`).
    ``release_dir``: the paper's released directions, for their norms and the
    cross-family figures."""

    s, out, t0 = settings or DemoSettings(), Path(out_dir), time.perf_counter()
    torch.manual_seed(s.seed)
    model = model_spec if hasattr(model_spec, "run_with_hooks") else load_model(model_spec)
    print(f"loaded {model_spec if isinstance(model_spec, str) else 'the given model'}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads "
          f"({model.cfg.n_key_value_heads or model.cfg.n_heads} KV heads) in {time.perf_counter() - t0:.1f}s")
    released, results = load_release(release_dir), {}
    progress = _Progress(out, model, s)
    seconds = progress.seconds

    def keep(name: str, run, /, *args, **kwargs) -> StageResult:
        if name in progress.done:  # finished by an earlier run of these settings on this model
            results[name] = stage = load_stage(out, name)
            print(f"{name}: the finished stage in {out} (resumed run)")
            return stage
        t = time.perf_counter()
        stage = run(model, *args, quiet=quiet, **kwargs)
        stage.save(out)
        progress.finish(name, time.perf_counter() - t)
        results[name] = stage
        return stage

    keep("distraction", run_distraction, n_prompts=s.n_prompts, seed=s.seed)
    scores = keep("contextual_heads", run_contextual_heads, n_prompts=s.n_prompts, seed=s.seed + 1,
                  n_settings=s.n_settings)
    scores = scores["contextual_heads"]
    keep("patching", run_patching, scores, n_pairs=s.n_pairs, n_candidates=s.n_candidates, n_ablation=s.n_ablation,
         ablation_ks=s.ablation_ks, seed=s.seed + 2)
    per_prompt, n_test, view = _steering(model, s, scores, keep, released, quiet, progress)
    focus = results["focus_directions"]
    if view is not None:
        progress.done.discard("prompt_views")  # seconds: its prompt object is not saved, so it is always redone
        keep("prompt_views", run_prompt_views, scores, view, directions=focus["focus_directions"],
             alpha=focus.summary["best"]["alpha"])
    if s.demo_cell and "focus_conditions_demo" not in progress.done:
        t = time.perf_counter()
        n_train, n_validation, n_test_cell = s.demo_cell_sizes
        run_demo_cell(model, n_train=n_train, n_validation=n_validation, n_test=n_test_cell, out_dir=out, quiet=quiet)
        progress.finish("focus_conditions_demo", time.perf_counter() - t)
    draw_all(results, out, tokenizer=model.tokenizer, released=released)
    total = time.perf_counter() - t0
    update_summary(out / "summary.json", "demo_run", {"settings": asdict(s), "stage_seconds": seconds,
                                                      "seconds": round(total, 1), "n_test_prompts": n_test,
                                                      "prefills_per_test_prompt": per_prompt})
    _print_final_table(results)
    print(f"\ndemo finished in {total:.0f}s; summary in {out / 'summary.json'}")
    return results


def _steering(model, s: DemoSettings, scores, keep, released: dict, quiet: bool,
              progress: _Progress) -> tuple[float, int, object]:
    """Split-softmax and focus directions on 20 documents (one prefill per test prompt
    serves both sweeps), then focus directions on 5. Returns the prefills per test prompt,
    the number of test prompts and the example the prompt views show (the first test
    question with the gold in the middle)."""

    splits = steering_splits(n_train=s.n_train, n_validation=s.n_validation, n_test=s.n_test, seed=s.seed + 4)
    sweeps = {"split_softmax", "focus_directions"}
    refs = reference_accuracies(model, splits["test"], quiet=quiet) if not sweeps <= progress.done else None
    prefills = PrefillStore()
    keep("split_softmax", run_split_softmax, scores, splits["test"], ks=s.split_ks, taus=s.taus, n_random=s.n_random,
         references=refs, prefills=prefills)
    keep("focus_directions", run_focus_directions, scores, splits, ks=s.focus_ks, alphas=s.alphas, refine=s.refine,
         references=refs, released=released, prefills=prefills, training=s.training)
    # both sweeps read back: the count their run measured (saved with the next stage)
    per_prompt = prefills.per_prompt() if prefills.prefills else (progress.per_prompt or float("nan"))
    progress.per_prompt = per_prompt
    progress.save()
    print(f"\nprefills per test prompt: {per_prompt:.2f} ({sum(prefills.prefills.values())} prefills for "
          f"{len(prefills.prefills)} distinct test prompts, {prefills.uses} sweep passes: split-softmax and focus directions)")
    prefills.clear()
    few = steering_splits(n_train=s.n_train, n_validation=s.n_validation, n_test=s.n_test, n_documents=5,
                          seed=s.seed + 8)
    few_refs = reference_accuracies(model, few["test"], quiet=quiet) \
        if "focus_directions_5_documents" not in progress.done else None
    keep("focus_directions_5_documents", run_focus_directions, scores, few, ks=s.focus_ks, alphas=s.alphas,
         refine=s.refine, references=few_refs, section="focus_directions_5_documents", training=s.training)
    middle = len(splits["positions"]) // 2
    return per_prompt, len(splits["test"]), splits["test"][middle] if len(splits["test"]) > middle else None


class _Progress:
    """Which stages an earlier, interrupted (or finished) :func:`run_demo` of the same
    settings on the same model saved under ``out``: those are read back
    (:func:`~focuslens.experiments.stages.load_stage`) instead of run again. Every stage
    draws its randomness from its own seeded generator, so a resumed run gives the numbers
    of an uninterrupted one. Kept as the ``"demo_progress"`` section of ``summary.json``,
    written with each stage's save."""

    SECTION = "demo_progress"

    def __init__(self, out: Path, model, settings: DemoSettings):
        import json

        from focuslens.model.load import model_id

        self.out = out
        self.identity = {"model": model_id(model), "settings": json.loads(json.dumps(asdict(settings)))}
        saved = read_summary(out / "summary.json").get(self.SECTION, {})  # {} when there is no summary
        same = saved.get("identity") == self.identity
        self.done: set[str] = set(saved.get("done", [])) if same else set()
        self.seconds: dict[str, float] = dict(saved.get("seconds", {})) if same else {}
        self.per_prompt = saved.get("prefills_per_test_prompt") if same else None
        if saved and not same:
            print(f"{out}: its saved stages are of other settings or another model; running every stage again")

    def finish(self, section: str, seconds: float) -> None:
        self.done.add(section)
        self.seconds[section] = round(seconds, 1)
        self.save()

    def save(self) -> None:
        update_summary(self.out / "summary.json", self.SECTION,
                       {"identity": self.identity, "done": sorted(self.done), "seconds": self.seconds,
                        "prefills_per_test_prompt": self.per_prompt})


def _print_final_table(results: dict[str, StageResult]) -> None:
    """One table with the headline number of every stage (accuracies with a 95 % Wilson
    interval over their prompts)."""
    s = {name: stage.summary for name, stage in results.items()}
    rows = []  # (name, value, number of prompts or None)
    if "distraction" in s:
        rows += [(f"accuracy, {n} document(s)", a, s["distraction"]["n_prompts"])
                 for n, a in s["distraction"]["accuracy"].items()]
    if "contextual_heads" in s:
        top = s["contextual_heads"]["top"][0]
        rows.append((f"top contextual head L{top[0]}H{top[1]} (gold mass)", top[2], None))
    if "patching" in s:
        rows.append(("contextual vs causal ranking (Spearman)", s["patching"]["spearman"], None))
    if "split_softmax" in s:
        ss, n = s["split_softmax"], s["split_softmax"]["n_test"]
        rows += [("split-softmax: unsteered", ss["baseline"], n), ("split-softmax: gold document only", ss["gold_only"], None),
                 ("split-softmax: gold document removed", ss["no_gold"], None)]
        if "top20" in ss:
            t = ss["top20"]
            rows += [(f"split-softmax: top-20 contextual heads, tau={t['best_tau']:g}", t["contextual"], n),
                     (f"split-softmax: 20 random heads, tau={t['best_tau']:g}", t["random"], n)]
    for key in ("focus_directions", "focus_directions_5_documents"):
        if key in s:
            fd, n = s[key], s[key]["n_test"]
            name = f"focus directions ({fd['n_documents']} documents)"
            rows += [(f"{name}: unsteered", fd["baseline_test"], n),
                     (f"{name}: k={fd['best']['k']}, alpha={fd['best']['alpha']:g} (chosen on validation)",
                      fd["best"]["test_acc"], n),
                     (f"{name}: alpha={fd['negative_alpha']}", fd["negative_alpha_test_acc"], n),
                     (f"{name}: magnitude control", fd["magnitude_control_test_acc"], n)]
    width = max(len(r[0]) for r in rows) if rows else 10
    print("\nSummary (held-out top-1 accuracy unless stated; [95% Wilson interval], n prompts)")
    for name, value, n in rows:
        ci = "" if value is None or n is None else "  [{:.3f}, {:.3f}] n={}".format(*wilson_interval(value, n), n)
        print(f"  {name:<{width}}  {'n/a' if value is None else f'{value:.3f}'}{ci}")
