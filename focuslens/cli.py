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

    info = sub.add_parser("info", help="load a model and print its shape")
    info.add_argument("--model", default="smollm2-135m-instruct")
    return p


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
