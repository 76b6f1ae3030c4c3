"""The ``focuslens`` command (thin: parses arguments, calls the Python API)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="focuslens", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded model")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--n-prompts", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="figures", help="directory for figures and summary.json")
    demo.add_argument("--release", help="the paper's release directory (head_{q,k}_directions_*.pth), "
                      "to compare its direction norms")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    dis = sub.add_parser("distraction", help="accuracy vs number of documents")
    dis.add_argument("--model", default="smollm2-135m-instruct")
    dis.add_argument("--n-prompts", type=int, default=100)
    dis.add_argument("--n-documents", type=int, nargs="+", default=[1, 5, 10, 20])
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--out", default="figures")
    dis.add_argument("--quiet", action="store_true")

    score = sub.add_parser("score", help="contextual scores of every head (+ head-location map)")
    score.add_argument("--model", default="smollm2-135m-instruct")
    score.add_argument("--n-prompts", type=int, default=100)
    score.add_argument("--n-documents", type=int, default=20)
    score.add_argument("--setting", choices=["documents", "gold_only"], default="documents")
    score.add_argument("--answer-rows", choices=["prefix", "greedy", "gold_answer"], default="prefix")
    score.add_argument("--seed", type=int, default=1)
    score.add_argument("--top", type=int, default=20, help="how many heads to print")
    score.add_argument("--out", default="figures")
    score.add_argument("--quiet", action="store_true")

    patch = sub.add_parser("patch", help="causal importance of heads: patching, ablation, agreement")
    patch.add_argument("--model", default="smollm2-135m-instruct")
    patch.add_argument("--scores", help="a HeadScores JSON from `focuslens score` (default: score now)")
    patch.add_argument("--n-pairs", type=int, default=8)
    patch.add_argument("--n-candidates", type=int, default=20, help="top contextual heads (+ as many random) patched exactly")
    patch.add_argument("--seed", type=int, default=2)
    patch.add_argument("--out", default="figures")
    patch.add_argument("--quiet", action="store_true")

    train = sub.add_parser("train-directions", help="learn focus directions for every head (model frozen)")
    train.add_argument("--model", default="smollm2-135m-instruct")
    train.add_argument("--scores", help="a HeadScores JSON whose ranking is stored with the directions "
                       "(default: score 100 prompts now)")
    train.add_argument("--n-train", type=int, default=200)
    train.add_argument("--n-validation", type=int, default=100)
    train.add_argument("--n-documents", type=int, default=20)
    train.add_argument("--answer-rows", choices=["prefix", "greedy", "gold_answer"], default="prefix")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--patience", type=int, default=2)
    train.add_argument("--seed", type=int, default=4)
    train.add_argument("--out", default="figures/focus_directions", help="directory for the artifact")
    train.add_argument("--quiet", action="store_true")

    steer = sub.add_parser("steer", help="steering sweeps: split-softmax (Fig. 3) and focus directions (Fig. 4)")
    steer.add_argument("method", choices=["split-softmax", "focus"])
    steer.add_argument("--model", default="smollm2-135m-instruct")
    steer.add_argument("--scores", help="HeadScores JSON for the head ranking (default: score 100 prompts now)")
    steer.add_argument("--directions", help="focus: a directory from `focuslens train-directions` "
                       "(default: train now)")
    steer.add_argument("--n-test", type=int, default=200)
    steer.add_argument("--n-validation", type=int, default=100)
    steer.add_argument("--n-documents", type=int, default=20)
    steer.add_argument("--ks", type=int, nargs="+", help="numbers of heads (focus: 0 means all heads)")
    steer.add_argument("--taus", type=float, nargs="+", default=[0.8, 0.5, 0.3, 0.1])
    steer.add_argument("--alphas", type=float, nargs="+", default=[-0.5, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 2.0])
    steer.add_argument("--n-random", type=int, default=3)
    steer.add_argument("--rows", choices=["answer", "all"], default="answer",
                       help="steer the answer rows only (one prefill per prompt) or every position (the paper's "
                       "intervention, one full forward per setting); default: answer")
    steer.add_argument("--release", help="the paper's release directory, to report its direction norms")
    steer.add_argument("--seed", type=int, default=4)
    steer.add_argument("--out", default="figures")
    steer.add_argument("--quiet", action="store_true")

    figs = sub.add_parser("figures", help="redraw every figure in --out from the saved results "
                          "(runs the demo first if they are missing)")
    figs.add_argument("--model", default="smollm2-135m-instruct")
    figs.add_argument("--out", default="figures")
    figs.add_argument("--release", help="the paper's release directory, for the cross-family figures")
    figs.add_argument("--quiet", action="store_true")

    exp = sub.add_parser("experiment", help="experiment grids; `experiment focus`: where focus directions help",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         epilog="example: focuslens experiment focus --out runs/focus --n-test 200")
    exp.add_argument("name", choices=["focus"], help="focus: task x layout x head ranking x rows")
    exp.add_argument("--model", default="smollm2-135m-instruct", help="model spec for load_model")
    exp.add_argument("--tasks", nargs="+", default=["synthetic", "synthetic_answer_free"], help="tasks")
    exp.add_argument("--layouts", nargs="+", default=["qa", "qa_query_aware"], help="prompt layouts")
    exp.add_argument("--rankings", nargs="+", default=["contextual", "chance_corrected", "gold_only", "attribution"],
                     help="head rankings (the first also runs rows=all and the mechanism)")
    exp.add_argument("--all-rows", nargs="*", default=["synthetic/qa_query_aware"],
                     help="task/layout pairs that also run rows=all (every position re-run per variant)")
    exp.add_argument("--n-train", type=int, default=80, help="training prompts (directions and rankings)")
    exp.add_argument("--n-validation", type=int, default=40, help="validation prompts (choose k, alpha)")
    exp.add_argument("--n-test", type=int, default=200, help="held-out test prompts (a multiple of 5)")
    exp.add_argument("--n-documents", type=int, default=20, help="documents per prompt")
    exp.add_argument("--epochs", type=int, default=40, help="direction training epochs")
    exp.add_argument("--lr", type=float, default=1e-2, help="direction training learning rate")
    exp.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50], help="numbers of heads (answer rows)")
    exp.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="alphas (answer rows)")
    exp.add_argument("--nq", help="task nq: the Lost-in-the-Middle NQ oracle file (nq-open-oracle.jsonl.gz)")
    exp.add_argument("--nq-documents", type=int, default=10, help="task nq: documents per prompt")
    exp.add_argument("--nq-questions", type=int, nargs=3, default=[40, 20, 20],
                     help="task nq: train / validation / test questions (test: 5 gold positions each)")
    exp.add_argument("--seed", type=int, default=7, help="data and training seed")
    exp.add_argument("--out", default="runs/focus_conditions", help="output directory")
    exp.add_argument("--quiet", action="store_true", help="no progress bars")

    info = sub.add_parser("info", help="load a model and print its shape")
    info.add_argument("--model", default="smollm2-135m-instruct")
    return p


def _score(args) -> None:
    from pathlib import Path

    from focuslens.data import make_synthetic_qa
    from focuslens.models import load_model
    from focuslens.scoring import score_heads
    from focuslens.viz import plot_head_map, save_figure

    model = load_model(args.model)
    examples = make_synthetic_qa(args.n_prompts, n_documents=args.n_documents, seed=args.seed)
    scores = score_heads(
        model, examples, setting=args.setting, answer_rows=args.answer_rows, quiet=args.quiet,
        data=f"synthetic n_documents={args.n_documents} seed={args.seed}",
    )
    out = Path(args.out)
    stem = f"scores_{args.setting}_{args.answer_rows}"
    scores.save(out / f"{stem}.json")
    scores.to_ranking_json(out / f"{stem}_relevant_heads.json")
    print(scores.to_dataframe().query("metric == 'gold'").nlargest(args.top, "value").to_string(index=False))
    print("wrote", *save_figure(plot_head_map(scores), out / stem, width=800, height=900),
          out / f"{stem}.json", out / f"{stem}_relevant_heads.json")


def _ranking_scores(model, args, out_dir):
    """The contextual-head ranking: from ``--scores``, or scored now (written to ``out_dir``)."""
    from focuslens.pipeline import run_contextual_heads
    from focuslens.scoring import HeadScores

    if args.scores:
        return HeadScores.load(args.scores, model=model)
    return run_contextual_heads(model, out_dir=out_dir, quiet=args.quiet)


def _train_directions(args) -> None:
    from pathlib import Path

    from focuslens.models import load_model
    from focuslens.pipeline import steering_splits
    from focuslens.training import train_directions

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

    from focuslens.directions import FocusDirections
    from focuslens.models import load_model
    from focuslens.pipeline import (
        reference_accuracies,
        run_focus_directions,
        run_split_softmax,
        steering_splits,
    )

    model = load_model(args.model)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    scores = _ranking_scores(model, args, args.out)
    splits = steering_splits(n_validation=args.n_validation, n_test=args.n_test, n_documents=args.n_documents,
                             seed=args.seed)
    refs = reference_accuracies(model, splits["test"], quiet=args.quiet)
    if args.method == "split-softmax":
        ks = tuple(args.ks or (1, 5, 10, 20, 50))
        run_split_softmax(model, scores, splits["test"], ks=ks, taus=tuple(args.taus), n_random=args.n_random,
                          references=refs, rows=args.rows, out_dir=args.out, quiet=args.quiet)
        return
    ks = tuple((k or None) for k in (args.ks or (1, 5, 10, 20, 50, 0)))
    directions = FocusDirections.load(args.directions, model=model) if args.directions else None
    run_focus_directions(model, scores, splits, ks=ks, alphas=tuple(args.alphas), references=refs,
                         directions=directions, release_dir=args.release, rows=args.rows, out_dir=args.out,
                         quiet=args.quiet)


def _figures(args) -> None:
    import json
    from pathlib import Path

    from focuslens.figures import draw_all
    from focuslens.models import load_model
    from focuslens.pipeline import run_demo

    summary = Path(args.out) / "summary.json"
    sections = json.loads(summary.read_text()) if summary.exists() else {}
    if not {"distraction", "contextual_heads", "patching", "split_softmax", "focus_directions"} <= set(sections):
        print(f"results missing in {args.out}: running the demo first")
        run_demo(args.model, out_dir=args.out, release_dir=args.release, quiet=args.quiet)
    draw_all(args.out, model=load_model(args.model), release_dir=args.release)


def _experiment(args) -> None:
    import time

    from focuslens.experiments import ConditionSettings, run_focus_conditions
    from focuslens.models import load_model

    pairs = tuple(tuple(p.split("/", 1)) for p in args.all_rows)
    settings = ConditionSettings(
        n_train=args.n_train, n_validation=args.n_validation, n_test=args.n_test, n_documents=args.n_documents,
        epochs=args.epochs, lr=args.lr, ks=tuple(args.ks), alphas=tuple(args.alphas), seed=args.seed,
        rankings=tuple(args.rankings), layouts=tuple(args.layouts), tasks=tuple(args.tasks), all_rows=pairs,
        nq_path=args.nq, nq_documents=args.nq_documents, nq_questions=tuple(args.nq_questions))
    t0 = time.perf_counter()
    out = run_focus_conditions(load_model(args.model), settings, out_dir=args.out, quiet=args.quiet)
    print(f"focus conditions: {len(out['cells'])} cells in {time.perf_counter() - t0:.0f}s; "
          f"{args.out}/focus_conditions.{{csv,png,html}} and summary.json")


def _check_paths(args) -> None:
    """Input files and the output folder, checked before any model loads."""
    from pathlib import Path

    from focuslens.errors import DataError

    for name in ("scores", "directions", "release", "nq"):
        value = getattr(args, name, None)
        if value and not Path(value).exists():
            raise DataError(f"--{name} {value}: no such file or folder.")
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out} is a file, not a folder.")


def _run(args) -> None:
    """Dispatch one parsed command to the Python API."""
    _check_paths(args)
    if args.command == "demo":
        from focuslens.pipeline import run_demo

        run_demo(args.model, n_prompts=args.n_prompts, seed=args.seed, out_dir=args.out,
                 release_dir=args.release, quiet=args.quiet)
    elif args.command == "distraction":
        from focuslens.models import load_model
        from focuslens.pipeline import run_distraction

        run_distraction(
            load_model(args.model),
            n_prompts=args.n_prompts,
            n_documents=tuple(args.n_documents),
            seed=args.seed,
            out_dir=args.out,
            quiet=args.quiet,
        )
    elif args.command == "score":
        _score(args)
    elif args.command == "experiment":
        _experiment(args)
    elif args.command == "patch":
        from focuslens.models import load_model
        from focuslens.pipeline import run_patching

        model = load_model(args.model)
        run_patching(model, _ranking_scores(model, args, args.out), n_pairs=args.n_pairs, n_candidates=args.n_candidates,
                     seed=args.seed, out_dir=args.out, quiet=args.quiet)
    elif args.command == "train-directions":
        _train_directions(args)
    elif args.command == "steer":
        _steer(args)
    elif args.command == "figures":
        _figures(args)
    elif args.command == "info":
        from focuslens.models import load_model

        m = load_model(args.model)
        c = m.cfg
        print(f"{c.model_name}: {c.n_layers} layers, {c.n_heads} heads, "
              f"{c.n_key_value_heads or c.n_heads} KV heads, d_head {c.d_head}, n_ctx {c.n_ctx}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; an error prints one line ``focuslens: error: …`` and exits 2 (a
    bug: 1); ``--debug`` shows the traceback instead."""
    args = _parser().parse_args(argv)
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
