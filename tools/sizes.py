"""Module and function sizes of the package, against the limits in the README.

    python tools/sizes.py           # list everything over the limits; exit 1 if any

Limits: a module ≤ 500 lines, a function ≤ 60 lines (an argparse table is exempt:
``experiments/cli._parser``). ``tests/test_sizes.py`` holds the ones still over them as a ratchet:
each may shrink, none may grow, and no new one may appear.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MODULE_LINES, FUNCTION_LINES = 500, 60
EXEMPT = {"focuslens/experiments/cli.py::_parser"}
ROOT = Path(__file__).resolve().parents[1]


def sizes(root: Path = ROOT) -> tuple[dict[str, int], dict[str, int]]:
    """``(modules, functions)``: line counts keyed by ``path`` and ``path::qualified.name``."""
    modules, functions = {}, {}
    for path in sorted((root / "focuslens").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        modules[rel] = len(text.splitlines())
        for node, qual in _functions(ast.parse(text)):
            functions[f"{rel}::{qual}"] = node.end_lineno - node.lineno + 1
    return modules, functions


def _functions(tree, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, prefix + node.name
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def over_limits(root: Path = ROOT) -> dict[str, int]:
    modules, functions = sizes(root)
    out = {k: v for k, v in modules.items() if v > MODULE_LINES}
    out |= {k: v for k, v in functions.items() if v > FUNCTION_LINES and k not in EXEMPT}
    return out


if __name__ == "__main__":
    bad = over_limits()
    for name, n in sorted(bad.items(), key=lambda kv: -kv[1]):
        print(f"{n:5d}  {name}")
    print(f"{len(bad)} over the limits ({MODULE_LINES} lines a module, {FUNCTION_LINES} a function)")
    sys.exit(1 if bad else 0)
