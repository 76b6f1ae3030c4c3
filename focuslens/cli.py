"""The ``focuslens`` command (thin: parses arguments, calls the Python API)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="focuslens", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded model")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--n-prompts", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="figures", help="directory for figures and summary.json")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from focuslens.errors import FocusLensError

    try:
        if args.command == "demo":
            from focuslens.pipeline import run_demo

            run_demo(args.model, n_prompts=args.n_prompts, seed=args.seed, out_dir=args.out, quiet=args.quiet)
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
        elif args.command == "patch":
            from focuslens.models import load_model
            from focuslens.pipeline import run_contextual_heads, run_patching
            from focuslens.scoring import HeadScores

            model = load_model(args.model)
            scores = (
                HeadScores.load(args.scores, model=model)
                if args.scores
                else run_contextual_heads(model, out_dir=args.out, quiet=args.quiet)
            )
            run_patching(model, scores, n_pairs=args.n_pairs, n_candidates=args.n_candidates,
                         seed=args.seed, out_dir=args.out, quiet=args.quiet)
        elif args.command == "info":
            from focuslens.models import load_model

            m = load_model(args.model)
            c = m.cfg
            print(f"{c.model_name}: {c.n_layers} layers, {c.n_heads} heads, "
                  f"{c.n_key_value_heads or c.n_heads} KV heads, d_head {c.d_head}, n_ctx {c.n_ctx}")
    except FocusLensError as err:
        print(f"focuslens: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
