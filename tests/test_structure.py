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
#: The data flow, as import layers: a module may import its own folder and any lower layer,
#: never a higher one (module level or inside a function). ``causal``, ``directions`` and
#: ``steer`` sit side by side after ``measure``; ``steer`` applies ``directions``, so it is
#: one step above them. ``viz`` draws what it is given; ``experiments`` runs everything and
#: calls ``viz`` to draw it. Top-level helpers (errors, io, progress) are the floor.
LAYERS = {"errors": -1, "io": 0, "progress": 0, "data": 1, "model": 2, "measure": 3, "causal": 4,
          "directions": 4, "steer": 5, "viz": 6, "experiments": 7}
TOP_LEVEL_MODULES = 6  # beside the folders: errors, io, progress and the like


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "focuslens").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("focuslens"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from focuslens.x import module`
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("focuslens")}
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_package_is_folders_in_data_flow_order():
    top = sorted(p.name for p in (ROOT / "focuslens").iterdir() if p.suffix == ".py" and p.name != "__init__.py")
    assert len(top) <= TOP_LEVEL_MODULES, f"modules directly under focuslens/: {top}"
    folders = {p.name for p in (ROOT / "focuslens").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {k for k in LAYERS if k not in ("errors", "io", "progress")}, folders
    for folder in folders:
        doc = ast.get_docstring(ast.parse((ROOT / "focuslens" / folder / "__init__.py").read_text())) or ""
        assert "Owns" in doc and "import" in doc, f"focuslens/{folder}/__init__.py must say what it owns and may import"


def test_imports_run_down_the_data_flow_including_function_level_ones():
    modules = _modules()
    for name, path in modules.items():
        own = _layer(name)
        if own is None:  # focuslens/__init__: the curated names, from anywhere
            continue
        for imported in _imports(path):
            target = _layer(imported) if imported in modules or imported.rsplit(".", 1)[0] in modules else None
            if target is None or target == own or target not in LAYERS:
                continue
            assert LAYERS[target] <= LAYERS[own], f"{name} ({own}) imports {imported} ({target}), a higher layer"
            assert LAYERS[target] < LAYERS[own], f"{name} ({own}) imports its sibling folder's {imported}"


def test_no_import_cycles_at_all():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for m in _imports(path):
            m = m if m in modules else m.rsplit(".", 1)[0]
            if m in modules and m != name and m != "focuslens":
                targets.add(m)
        graph[name] = targets
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules (its __init__ re-exports them)
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*stack, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_the_cycle_test_sees_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from focuslens.steer.focus import focus\n")
    assert "focuslens.steer.focus" in _imports(tmp_path / "a.py")


def test_public_names_are_few_and_real():
    assert len(focuslens.__all__) <= 22  # README "Concepts": the names a notebook starts from
    for name in _modules():
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", []):
            assert not public.startswith("_"), f"{name}.__all__ lists the private {public!r}"
            assert hasattr(module, public), f"{name}.__all__ lists {public!r}, which it does not define"
