"""The shape of the package: imports flow one way, public names are few and real, sizes
stay inside the limits.

Sizes are a ratchet (``tools/sizes.py``): ``STILL_OVER`` lists what is over the limits
today with its size; each may shrink (then lower or drop its entry), none may grow, and
nothing new may cross a limit.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import focuslens

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sizes", ROOT / "tools" / "sizes.py")
sizes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sizes)

STILL_OVER: dict[str, int] = {}


def test_nothing_new_crosses_a_size_limit_and_nothing_over_grows():
    over = sizes.over_limits(ROOT)
    new = sorted(set(over) - set(STILL_OVER))
    assert not new, f"over the limits and not listed: {[(n, over[n]) for n in new]}"
    grown = {n: (over[n], STILL_OVER[n]) for n in over if over[n] > STILL_OVER[n]}
    assert not grown, f"grew past their listed size (now, listed): {grown}"


def test_the_size_counter_counts_lines_of_modules_and_nested_functions(tmp_path):
    pkg = tmp_path / "focuslens"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (pkg / "m.py").write_text(f"def long():\n{body}\n\n\nclass A:\n    def short(self):\n        return 1\n")
    modules, functions = sizes.sizes(tmp_path)
    assert modules == {"focuslens/m.py": 76}
    assert functions == {"focuslens/m.py::long": 71, "focuslens/m.py::A.short": 2}
    assert sizes.over_limits(tmp_path) == {"focuslens/m.py::long": 71}


# ------------------------------------------------------------------ imports
#: the orchestration layer: stages, figures, CLI. Everything else is core.
TOP = {"focuslens.pipeline", "focuslens.figures", "focuslens.cli", "focuslens.experiments"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "focuslens").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("focuslens"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("focuslens")}
    return found


def test_core_never_imports_figures_or_the_cli():
    for name, path in _modules().items():
        if name in TOP or name.startswith("focuslens.viz"):
            continue
        bad = {m for m in _imports(path, module_level_only=False)
               if m.startswith("focuslens.viz") or m in TOP}
        assert not bad, f"{name} (core) imports {sorted(bad)}"


def test_module_level_imports_have_no_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(path, module_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*stack, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_public_names_are_few_and_real():
    assert len(focuslens.__all__) <= 20
    for name in _modules():
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", []):
            assert not public.startswith("_"), f"{name}.__all__ lists the private {public!r}"
            assert hasattr(module, public), f"{name}.__all__ lists {public!r}, which it does not define"
