"""The ``focuslens`` command (thin: parses arguments, calls the Python API)."""

from __future__ import annotations

import argparse
import sys

from focuslens.experiments.checks import check_arguments

__all__ = ["main"]


_MODEL = "smollm2-135m-instruct"


def _command(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand that shows every default and one example; with --model and --quiet."""
    cmd = sub.add_parser(name, help=help, description=help, epilog=f"example: {example}",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cmd.add_argument("--model", default=_MODEL, help="model for load_model: the embedded SmolLM2, a HF id or a folder")
    cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    return cmd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="focuslens", description="focuslens: contextual heads and focus directions "
                                "on TransformerLens (Zhu et al. 2025). Each command runs one experiment and writes "
                                "its results and figures under --out (never the committed figures/ unless asked).")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")
    sub = p.add_subparsers(dest="command", required=True)

    demo = _command(sub, "demo", "run every stage of the pipeline", "focuslens demo --size quick --out runs/demo")
    demo.add_argument("--size", choices=["quick", "full"], default="quick",
                      help="quick: every stage small (minutes); full: the sizes behind the README's numbers")
    demo.add_argument("--n-prompts", type=int, help="prompts for distraction and scoring (default: the size's)")
    demo.add_argument("--seed", type=int, default=0, help="seed of every stage's data")
    demo.add_argument("--out", default="runs/demo", help="folder for figures, CSVs, artifacts and summary.json")
    demo.add_argument("--release", help="the paper's release folder (one sub-folder per model), for its norms")

    dis = _command(sub, "distraction", "accuracy vs number of documents",
                   "focuslens distraction --n-prompts 20 --n-documents 1 5 20")
    dis.add_argument("--n-prompts", type=int, default=100, help="questions per row")
    dis.add_argument("--n-documents", type=int, nargs="+", default=[1, 5, 10, 20], help="documents per prompt")
    dis.add_argument("--seed", type=int, default=0, help="data seed")
    dis.add_argument("--out", default="runs/distraction", help="output folder")

    score = _command(sub, "score", "contextual scores of every head (+ head-location map)",
                     "focuslens score --n-prompts 20 --out runs/score  (then: patch --scores runs/score/contextual_heads.json)")
    score.add_argument("--n-prompts", type=int, default=100, help="prompts to score on")
    score.add_argument("--n-documents", type=int, default=20, help="documents per prompt")
    score.add_argument("--setting", choices=["documents", "gold_only"], default="documents",
                       help="score with every document, or with the gold document alone")
    score.add_argument("--answer-rows", choices=["prefix", "greedy", "gold_answer"], default="prefix",
                       help="which rows attend: the answer prefix, the greedy answer, or the gold answer's tokens")
    score.add_argument("--seed", type=int, default=1, help="data seed")
    score.add_argument("--top", type=int, default=20, help="how many heads to print")
    score.add_argument("--out", default="runs/score", help="output folder (contextual_heads.json + figure)")
    score.add_argument("--processes", type=int, default=1,
                       help="data parallel: N processes share the prompts (accelerate launch; same scores)")

    ranking_help = "a HeadScores JSON (contextual_heads.json from `focuslens score`); default: score now"
    patch = _command(sub, "patch", "causal importance of heads: patching, ablation, agreement",
                     "focuslens patch --scores runs/score/contextual_heads.json --n-pairs 4 --n-ablation 4")
    patch.add_argument("--scores", help=ranking_help)
    patch.add_argument("--n-score-prompts", type=int, default=100, help="prompts to score on when --scores is absent")
    patch.add_argument("--n-pairs", type=int, default=8, help="counterfactual pairs for patching")
    patch.add_argument("--n-candidates", type=int, default=20, help="top contextual heads (+ as many random) patched exactly")
    patch.add_argument("--n-ablation", type=int, default=16, help="prompts for group ablation")
    patch.add_argument("--seed", type=int, default=2, help="data seed")
    patch.add_argument("--out", default="runs/patch", help="output folder")

    train = _command(sub, "train-directions", "learn focus directions for every head (model frozen)",
                     "focuslens train-directions --n-train 40 --n-validation 20 --epochs 20 --lr 1e-2")
    train.add_argument("--scores", help=ranking_help + " (its ranking is stored with the directions)")
    train.add_argument("--n-score-prompts", type=int, default=100, help="prompts to score on when --scores is absent")
    train.add_argument("--n-train", type=int, default=200, help="training prompts")
    train.add_argument("--n-validation", type=int, default=100, help="validation prompts (early stopping)")
    train.add_argument("--n-documents", type=int, default=20, help="documents per prompt")
    train.add_argument("--answer-rows", choices=["prefix", "greedy", "gold_answer"], default="prefix",
                       help="which rows' attention is trained")
    train.add_argument("--epochs", type=int, default=10, help="passes over the training prompts")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    train.add_argument("--batch-size", type=int, default=1, help="prompts per step")
    train.add_argument("--patience", type=int, default=2, help="epochs without validation gain before a head stops")
    train.add_argument("--seed", type=int, default=4, help="data and initialisation seed")
    train.add_argument("--out", default="runs/focus_directions", help="folder of the artifact")

    steer = _command(sub, "steer", "steering sweeps: split-softmax (Fig. 3) and focus directions (Fig. 4)",
                     "focuslens steer split-softmax --n-test 20 --ks 5 20 --taus 0.5 0.1")
    steer.add_argument("method", choices=["split-softmax", "focus"], help="which intervention to sweep")
    steer.add_argument("--scores", help=ranking_help)
    steer.add_argument("--n-score-prompts", type=int, default=100, help="prompts to score on when --scores is absent")
    steer.add_argument("--directions", help="focus: a folder from `focuslens train-directions` (default: train now)")
    steer.add_argument("--n-train", type=int, default=200, help="focus: training prompts when --directions is absent")
    steer.add_argument("--n-test", type=int, default=200, help="held-out prompts (a multiple of the 5 gold positions)")
    steer.add_argument("--n-validation", type=int, default=100, help="validation prompts (choose k, alpha)")
    steer.add_argument("--n-documents", type=int, default=20, help="documents per prompt")
    steer.add_argument("--ks", type=int, nargs="+",
                       help="numbers of heads (focus: 0 means all heads); default 1 5 10 20 50 (focus: and all)")
    steer.add_argument("--taus", type=float, nargs="+", default=[0.8, 0.5, 0.3, 0.1], help="split-softmax exponents")
    steer.add_argument("--alphas", type=float, nargs="+", default=[-0.5, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 2.0],
                       help="focus: direction scales")
    steer.add_argument("--n-random", type=int, default=3, help="split-softmax: random head sets per k")
    steer.add_argument("--rows", choices=["answer", "all"], default="answer",
                       help="steer the answer rows only (one prefill per prompt) or every position (the paper's "
                       "intervention, one full forward per setting)")
    steer.add_argument("--release", help="the paper's release folder, to report its direction norms")
    steer.add_argument("--seed", type=int, default=4, help="data seed")
    steer.add_argument("--out", default="runs/steer", help="output folder")

    figs = _command(sub, "figures", "redraw every figure in --out from the saved results (runs the quick demo "
                    "first if --out has no summary.json); the model only names the tokens of the prompt views",
                    "focuslens figures --out runs/demo")
    figs.add_argument("--out", default="runs/demo", help="a folder written by `focuslens demo`")
    figs.add_argument("--release", help="the paper's release folder, for the cross-family figures")

    exp = _command(sub, "experiment", "experiment grids; `experiment focus`: where focus directions help; "
                   "`experiment nq`: focus directions at the paper's NQ data size (resumable; make nq-focus); "
                   "`experiment families`: every stage on SmolLM2 and Gemma 3 with one recipe, compared "
                   "(make families)",
                   "focuslens experiment focus --out runs/focus --n-test 200")
    exp.add_argument("name", choices=["focus", "nq", "families", "methods"],
                     help="focus: task x layout x head ranking x rows; "
                     "nq: train >= 1,000 NQ questions, test 300 x first/middle/last at 10 and 20 documents; "
                     "families: the demo pipeline on each of --models, then the comparison figures; "
                     "methods: the field's head scores and interventions on the same prompts (make methods)")
    exp.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"],
                     help="families: the models compared (embedded names, folders or HF ids)")
    exp.add_argument("--size", choices=["quick", "full"], default="full",
                     help="families: the demo settings each model runs (full: n >= 100 per distraction point)")
    exp.add_argument("--release", help="families: the paper's release folder, drawn beside the trained models")
    exp.add_argument("--reuse", nargs="+", default=[], metavar="MODEL=FOLDER",
                     help="families: a finished demo run of the same settings to read instead of running that model "
                          "again (e.g. smollm2-135m-instruct=figures)")
    exp.add_argument("--tasks", nargs="+", default=["synthetic", "synthetic_answer_free"], help="tasks")
    exp.add_argument("--layouts", nargs="+", default=["qa", "qa_query_aware"], help="prompt layouts")
    exp.add_argument("--rankings", nargs="+", default=["contextual", "chance_corrected", "gold_only", "attribution"],
                     help="head rankings (the first also runs rows=all and the mechanism)")
    exp.add_argument("--all-rows", nargs="*", default=["synthetic/qa_query_aware"],
                     help="task/layout pairs that also run rows=all (every position re-run per variant)")
    exp.add_argument("--n-train", type=int, default=80, help="training prompts (directions and rankings)")
    exp.add_argument("--n-validation", type=int, help="validation prompts (choose k, alpha; focus: 40, methods: 100)")
    exp.add_argument("--n-test", type=int, default=200, help="held-out test prompts (a multiple of 5)")
    exp.add_argument("--n-documents", type=int, default=20, help="documents per prompt")
    exp.add_argument("--epochs", type=int, help="direction training epochs (focus: 40; nq: 10, early stopped)")
    exp.add_argument("--lr", type=float, help="direction training learning rate (focus: 1e-2; nq: 1e-3, the paper's)")
    exp.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50], help="numbers of heads (answer rows)")
    exp.add_argument("--alphas", type=float, nargs="+", help="alphas (answer rows; focus: 0.25 0.5 1 2; nq: also 4)")
    exp.add_argument("--nq", help="task nq: the Lost-in-the-Middle NQ oracle file (nq-open-oracle.jsonl.gz)")
    exp.add_argument("--nq-documents", type=int, default=10, help="task nq: documents per prompt")
    exp.add_argument("--nq-questions", type=int, nargs=3,
                     help="NQ train / validation / test questions (focus, task nq: 40 20 20, test at 5 gold "
                          "positions; nq: 1000 150 300, test first/middle/last)")
    exp.add_argument("--test-documents", type=int, nargs="+", default=[10, 20],
                     help="nq: documents per test prompt (the setting is chosen at --nq-documents)")
    exp.add_argument("--max-new-tokens", type=int, default=16, help="nq: greedy answer length")
    exp.add_argument("--work", default="runs/nq_work",
                     help="nq: the resumable run's working folder (training cache ~16 MB per prompt, checkpoints)")
    exp.add_argument("--run", default="figures/families/smollm2-135m-instruct",
                     help="methods: a finished demo run (its contextual_heads.json and focus_directions/) for the "
                          "synthetic prompts")
    exp.add_argument("--nq-directions", default="figures/nq_directions",
                     help="methods: the NQ experiment's directions (their ranking picks the labelled methods' heads)")
    exp.add_argument("--datasets", nargs="+", choices=["synthetic", "nq"], default=["synthetic", "nq"],
                     help="methods: where the interventions are compared (nq needs --nq)")
    exp.add_argument("--methods", nargs="+", help="methods: interventions to compare (default: every registered one)")
    exp.add_argument("--head-scores", nargs="+", help="methods: head scores to compare (default: every registered one)")
    exp.add_argument("--n-rank", type=int, default=100, help="methods: prompts the head scores are computed on")
    exp.add_argument("--n-calibration", type=int, default=50,
                     help="methods: training prompts the positional profiles are measured on")
    exp.add_argument("--k", type=int, default=20, help="methods: heads the labelled interventions act on (top k)")
    exp.add_argument("--seed", type=int, help="data and training seed (focus: 7, methods: 0)")
    exp.add_argument("--out", default="runs/focus_conditions", help="output directory")

    lc = _command(sub, "long-context", "distraction from ~1k to ~8k tokens (NQ, key-value retrieval, a needle with "
                  "near misses) and split-softmax at each length; resumes a stopped run in --out",
                  "focuslens long-context --tasks needle --n-prompts 10 --out runs/long_context")
    lc.add_argument("--tasks", nargs="+", choices=["needle", "nq", "kv"], default=["needle", "nq", "kv"], help="tasks")
    lc.add_argument("--n-prompts", type=int, default=100, help="prompts per task and length (gold first/middle/last in turn)")
    lc.add_argument("--needle-documents", type=int, nargs="+", default=[10, 20, 40, 80], help="haystack sizes")
    lc.add_argument("--nq-documents", type=int, nargs="+", default=[10, 20, 30, 50], help="NQ documents per prompt")
    lc.add_argument("--kv-keys", type=int, nargs="+", default=[25, 50, 75, 110], help="key-value pairs per prompt")
    lc.add_argument("--k", type=int, default=20, help="split-softmax on the top k contextual heads")
    lc.add_argument("--tau", type=float, default=0.1, help="split-softmax exponent")
    lc.add_argument("--scores", help=ranking_help)
    lc.add_argument("--n-score-prompts", type=int, default=100, help="prompts to score on when --scores is absent")
    lc.add_argument("--nq", help="task nq: the Lost-in-the-Middle NQ oracle file (nq-open-oracle.jsonl.gz)")
    lc.add_argument("--seed", type=int, default=0, help="data seed")
    lc.add_argument("--out", default="runs/long_context", help="output folder (progress is kept there)")

    _command(sub, "info", "load a model and print its shape", "focuslens info --model smollm2-135m-instruct")
    return p


def _relaunch(argv: list[str], processes: int) -> None:
    """Run this same command line in ``processes`` processes under accelerate (torchrun;
    gloo on CPU), without ``--processes``; returns when they are done."""
    import os
    import subprocess

    from focuslens.errors import DataError

    argv = list(argv)
    if "--processes" in argv:
        i = argv.index("--processes")
        del argv[i : i + 2]
    argv = [a for a in argv if not a.startswith("--processes=")]
    from focuslens.model.parallel import launch_command

    cmd = [*launch_command(processes), "-m", "focuslens.experiments.cli", *argv]
    if subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode:
        raise DataError(f"the {processes} processes of `{' '.join(argv)}` failed (their errors are above).")


def _score(args) -> None:
    from pathlib import Path

    from focuslens.data import make_synthetic_qa
    from focuslens.measure.scoring import score_heads
    from focuslens.model.load import load_model
    from focuslens.model.parallel import is_main, world
    from focuslens.viz import plot_head_map, save_figure

    if args.processes < 1:
        from focuslens.errors import DataError

        raise DataError(f"--processes {args.processes}: use 1 or more.")
    if args.processes > 1 and world()[1] == 1:  # not yet under the launcher
        return _relaunch(args.argv, args.processes)
    model = load_model(args.model)
    examples = make_synthetic_qa(args.n_prompts, n_documents=args.n_documents, seed=args.seed)
    scores = score_heads(
        model, examples, setting=args.setting, answer_rows=args.answer_rows, quiet=args.quiet,
        data=f"synthetic n_documents={args.n_documents} seed={args.seed}",
    )
    if not is_main():  # every process holds the scores; one writes them
        return
    out = Path(args.out)
    scores.save(out / "contextual_heads.json")  # what `patch/steer/train-directions --scores` read
    scores.to_ranking_json(out / "relevant_heads.json")  # the paper's ranking format
    print(scores.to_dataframe().query("metric == 'gold'").nlargest(args.top, "value").to_string(index=False))
    print("wrote", *save_figure(plot_head_map(scores), out / "contextual_heads", width=800, height=900),
          out / "contextual_heads.json", out / "relevant_heads.json")
    print(f"next: focuslens patch --scores {out / 'contextual_heads.json'}")


def _keep(stage, out, *figure_args) -> None:
    """Save a stage under ``out`` and draw its figure."""
    from focuslens.experiments import figures

    stage.save(out)
    section = "focus_directions" if stage.section.startswith("focus_directions") else stage.section
    getattr(figures, f"draw_{section}")(stage, *figure_args, out)


def _ranking_scores(model, args, out_dir):
    """The contextual-head ranking: from ``--scores``, or scored now (saved to ``out_dir``)."""
    from focuslens.experiments.stages import run_contextual_heads
    from focuslens.measure.scoring import HeadScores

    if args.scores:
        return HeadScores.load(args.scores, model=model)
    stage = run_contextual_heads(model, n_prompts=args.n_score_prompts, n_settings=0, quiet=args.quiet)
    _keep(stage, out_dir)
    return stage["contextual_heads"]


def _train_directions(args) -> None:
    from pathlib import Path

    from focuslens.data.splits import steering_splits
    from focuslens.directions.train import train_directions
    from focuslens.model.load import load_model

    model = load_model(args.model)
    scores = _ranking_scores(model, args, Path(args.out).parent)
    splits = steering_splits(n_train=args.n_train, n_validation=args.n_validation, n_test=0,
                             n_documents=args.n_documents, seed=args.seed)
    dirs = train_directions(
        model, splits["train"], splits["validation"], answer_rows=args.answer_rows, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, patience=args.patience, seed=args.seed, ranking=scores.ranking(),
        data=f"synthetic n_documents={args.n_documents} seed={args.seed}", quiet=args.quiet,
    )
    print(f"trained {dirs.shape} in {dirs.metadata['train_seconds']:.1f}s after caching for "
          f"{dirs.metadata['cache_seconds']:.0f}s; norms {dirs.norm_summary()}")
    print("wrote", dirs.save(args.out))


def _steer(args) -> None:
    from pathlib import Path

    from focuslens.data.splits import steering_splits
    from focuslens.directions.artifact import FocusDirections
    from focuslens.experiments.pipeline import load_release
    from focuslens.experiments.stages import run_focus_directions, run_split_softmax
    from focuslens.measure.evaluate import reference_accuracies
    from focuslens.model.load import load_model

    model = load_model(args.model)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    scores = _ranking_scores(model, args, args.out)
    splits = steering_splits(n_train=args.n_train if args.method == "focus" and not args.directions else 0,
                             n_validation=args.n_validation, n_test=args.n_test, n_documents=args.n_documents,
                             seed=args.seed)
    refs = reference_accuracies(model, splits["test"], quiet=args.quiet)
    if args.method == "split-softmax":
        ks = tuple(args.ks or (1, 5, 10, 20, 50))
        _keep(run_split_softmax(model, scores, splits["test"], ks=ks, taus=tuple(args.taus), n_random=args.n_random,
                                references=refs, rows=args.rows, quiet=args.quiet), args.out)
        return
    ks = tuple((k or None) for k in (args.ks or (1, 5, 10, 20, 50, 0)))
    directions = FocusDirections.load(args.directions, model=model) if args.directions else None
    _keep(run_focus_directions(model, scores, splits, ks=ks, alphas=tuple(args.alphas), references=refs,
                               directions=directions, released=load_release(args.release), rows=args.rows,
                               quiet=args.quiet), args.out)


def _figures(args) -> None:
    """Redraw from the saved results; the quick demo runs only into a folder with no
    summary.json at all (never over a user's results: a broken one is an error, exit 2)."""
    from pathlib import Path

    from focuslens.errors import DataError
    from focuslens.experiments.figures import draw_all
    from focuslens.experiments.pipeline import DemoSettings, load_release, load_results, run_demo
    from focuslens.model.load import load_model

    summary = Path(args.out) / "summary.json"
    if not summary.exists():
        print(f"no results in {args.out} (no summary.json): running the quick demo first")
        run_demo(args.model, settings=DemoSettings.quick(), out_dir=args.out, release_dir=args.release, quiet=args.quiet)
        return
    results = load_results(args.out)  # an unreadable file raises DataError naming it
    missing = [s for s in ("distraction", "contextual_heads", "patching", "split_softmax", "focus_directions")
               if s not in results]
    if missing:
        raise DataError(f"{summary} has no {', '.join(missing)} section(s): run `focuslens demo --out {args.out}` "
                        "to compute them (it rewrites that folder), or pass another --out.")
    draw_all(results, args.out, tokenizer=load_model(args.model).tokenizer, released=load_release(args.release))


def _experiment_nq(args) -> None:
    """``focuslens experiment nq`` (:func:`focuslens.experiments.nq.run_nq`)."""
    from focuslens.experiments.nq import NQSettings, run_nq
    from focuslens.experiments.nq_report import headline
    from focuslens.model.load import load_model

    n_train, n_val, n_test = args.nq_questions or (1000, 150, 300)
    settings = NQSettings(nq_path=args.nq or "", n_train=n_train, n_validation=n_val, n_test=n_test,
                          n_documents=args.nq_documents, test_documents=tuple(args.test_documents),
                          epochs=args.epochs or 10, lr=args.lr or 1e-3, ks=tuple(args.ks),
                          alphas=tuple(args.alphas or (0.25, 0.5, 1.0, 2.0, 4.0)), max_new_tokens=args.max_new_tokens,
                          em_documents=(args.nq_documents,), seed=7 if args.seed is None else args.seed)
    out = run_nq(load_model(args.model), settings, out_dir=args.out, work_dir=args.work, quiet=args.quiet)
    print(f"{headline(out)}\n{args.out}/nq_focus.{{csv,png,html}} and summary.json")


def _experiment(args) -> None:
    import time

    from focuslens.experiments.conditions import ConditionSettings, run_focus_conditions
    from focuslens.model.load import load_model

    if args.name == "nq":
        return _experiment_nq(args)
    if args.name == "methods":
        from focuslens.experiments.methods import run_from_args

        return run_from_args(args)
    if args.name == "families":
        from focuslens.experiments.families import run_families
        from focuslens.experiments.pipeline import DemoSettings

        out = "figures/families" if args.out == "runs/focus_conditions" else args.out  # its own default folder
        settings = DemoSettings.quick() if args.size == "quick" else DemoSettings()
        from focuslens.errors import DataError

        bad = [r for r in args.reuse if "=" not in r]
        if bad:
            raise DataError(f"--reuse {bad[0]!r}: write MODEL=FOLDER.")
        reuse = dict(r.split("=", 1) for r in args.reuse)
        run_families(args.models, settings=settings, out_dir=out, release_dir=args.release, reuse=reuse,
                     quiet=args.quiet)
        print(f"{out}/families.{{csv,png,html}}, families_*.png and summary.json")
        return None
    pairs = tuple(tuple(p.split("/", 1)) for p in args.all_rows)
    settings = ConditionSettings(
        n_train=args.n_train, n_validation=40 if args.n_validation is None else args.n_validation, n_test=args.n_test, n_documents=args.n_documents,
        epochs=args.epochs or 40, lr=args.lr or 1e-2, ks=tuple(args.ks), alphas=tuple(args.alphas or (0.25, 0.5, 1.0, 2.0)),
        seed=7 if args.seed is None else args.seed, rankings=tuple(args.rankings), layouts=tuple(args.layouts), tasks=tuple(args.tasks),
        all_rows=pairs, nq_path=args.nq, nq_documents=args.nq_documents,
        nq_questions=tuple(args.nq_questions or (40, 20, 20)))
    t0 = time.perf_counter()
    out = run_focus_conditions(load_model(args.model), settings, out_dir=args.out, quiet=args.quiet)
    print(f"focus conditions: {len(out['cells'])} cells in {time.perf_counter() - t0:.0f}s; "
          f"{args.out}/focus_conditions.{{csv,png,html}} and summary.json")


def _long_context(args) -> None:
    from pathlib import Path

    from focuslens.errors import DataError
    from focuslens.experiments.stages.long_context import run_long_context
    from focuslens.model.load import load_model

    if "nq" in args.tasks and not args.nq:
        raise DataError("--tasks nq needs --nq <the Lost-in-the-Middle NQ oracle file>.")
    model = load_model(args.model)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    scores = _ranking_scores(model, args, args.out)
    lengths = {"needle": args.needle_documents, "nq": args.nq_documents, "kv": args.kv_keys}
    stage = run_long_context(model, scores, out_dir=args.out, tasks=tuple(args.tasks), lengths=lengths,
                             n_prompts=args.n_prompts, k=args.k, tau=args.tau, seed=args.seed, nq_path=args.nq,
                             quiet=args.quiet)
    _keep(stage, args.out)


def _run(args) -> None:
    """Dispatch one parsed command to the Python API."""
    check_arguments(args)
    if args.command == "demo":
        from dataclasses import replace

        from focuslens.experiments.pipeline import DemoSettings, run_demo

        settings = replace(DemoSettings.quick() if args.size == "quick" else DemoSettings(), seed=args.seed)
        if args.n_prompts is not None:
            settings = replace(settings, n_prompts=args.n_prompts)
        run_demo(args.model, settings=settings, out_dir=args.out, release_dir=args.release, quiet=args.quiet)
    elif args.command == "distraction":
        from focuslens.experiments.stages import run_distraction
        from focuslens.model.load import load_model

        _keep(run_distraction(load_model(args.model), n_prompts=args.n_prompts, n_documents=tuple(args.n_documents),
                              seed=args.seed, quiet=args.quiet), args.out)
    elif args.command == "score":
        _score(args)
    elif args.command == "experiment":
        _experiment(args)
    elif args.command == "patch":
        from focuslens.experiments.stages import StageResult, run_patching
        from focuslens.model.load import load_model

        model = load_model(args.model)
        scores = _ranking_scores(model, args, args.out)
        stage = run_patching(model, scores, n_pairs=args.n_pairs, n_candidates=args.n_candidates,
                             n_ablation=args.n_ablation, seed=args.seed, quiet=args.quiet)
        _keep(stage, args.out, StageResult("contextual_heads", {}, artifacts={"contextual_heads": scores}))
    elif args.command == "train-directions":
        _train_directions(args)
    elif args.command == "steer":
        _steer(args)
    elif args.command == "figures":
        _figures(args)
    elif args.command == "long-context":
        _long_context(args)
    elif args.command == "info":
        from focuslens.model.load import load_model

        m = load_model(args.model)
        c = m.cfg
        print(f"{c.model_name}: {c.n_layers} layers, {c.n_heads} heads, "
              f"{c.n_key_value_heads or c.n_heads} KV heads, d_head {c.d_head}, n_ctx {c.n_ctx}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; an error prints one line ``focuslens: error: …`` and exits 2 (a
    bug: 1); ``--debug`` shows the traceback instead."""
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --processes, which runs it again
    from focuslens.errors import FocusLensError

    try:
        _run(args)
    except (FocusLensError, OSError) as err:
        if args.debug:
            raise
        print(f"focuslens: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not a user mistake: still one line unless --debug
        if args.debug:
            raise
        print(f"focuslens: error: unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
