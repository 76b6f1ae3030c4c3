"""What the ``focuslens`` command checks before it loads a model: a wrong path, number or
damaged saved file found after minutes of loading and running would cost the whole run."""

from __future__ import annotations

__all__ = ["check_arguments"]


def check_arguments(args) -> None:
    """Input files, the output folder, every number and the saved files a command reads,
    checked before any model loads (a ``DataError`` naming the argument or file)."""
    from pathlib import Path

    from focuslens.errors import DataError

    for name in ("scores", "directions", "release", "nq"):
        value = getattr(args, name, None)
        if value and not Path(value).exists():
            raise DataError(f"--{name} {value}: no such file or folder.")
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out} is a file, not a folder.")
    _check_numbers(args)
    _check_saved(args, out)
    if args.command == "steer":
        from focuslens.data.splits import gold_positions

        positions = gold_positions(args.n_documents)
        if args.n_test <= 0 or args.n_test % len(positions):
            raise DataError(f"--n-test {args.n_test}: each test question appears once per gold position {positions}, "
                            f"so --n-test must be a positive multiple of {len(positions)}.")


#: the least value of each count argument (every other count: at least 1)
_LEAST = {"n_random": 0, "ks": 0, "seed": 0, "n_validation": 0}


def _check_numbers(args) -> None:
    """Counts are whole numbers of at least 1 (``_LEAST``), rates and exponents positive and
    finite, strengths finite: a ``DataError`` naming the argument, before any model loads."""
    import math

    from focuslens.errors import DataError

    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        flag = "--" + name.replace("_", "-")
        for v in values:
            if isinstance(v, bool) or v is None or not isinstance(v, int | float):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise DataError(f"{flag} {v}: must be a finite number.")
            if isinstance(v, int) and v < _LEAST.get(name, 1):
                raise DataError(f"{flag} {v}: must be at least {_LEAST.get(name, 1)}.")
            if name in ("lr", "tau", "taus") and v <= 0:
                raise DataError(f"{flag} {v}: must be positive.")


def _check_saved(args, out) -> None:
    """The files a command will read or add to, read now, before any model loads: the
    summary and manifest in ``--out`` (a broken one would otherwise cost the whole run),
    ``--scores`` and ``--directions``; a ``DataError`` names the file."""
    from pathlib import Path

    from focuslens.io import RUN, check_unit, has_manifest, read_summary

    if out and args.command != "train-directions" and Path(out).is_dir():
        read_summary(Path(out) / "summary.json")
        if has_manifest(out):
            check_unit(out, kind=RUN, names=[])  # the manifest readable, and of a run folder
    if getattr(args, "scores", None):
        from focuslens.measure.scoring import HeadScores

        HeadScores.load(args.scores)
    if getattr(args, "directions", None):
        from focuslens.directions.artifact import FocusDirections

        FocusDirections.load(args.directions)
