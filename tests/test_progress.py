"""In Jupyter without ipywidgets, ``import focuslens`` and its progress bars print no
``TqdmWarning: IProgress not found``: they fall back to text bars quietly
(``focuslens.progress``). Checked in a real IPython kernel, where tqdm.auto warns."""

from __future__ import annotations

import json

import pytest

# ipywidgets hidden (as if not installed), tqdm forgotten so its first import happens here
CELL = """
import json, sys, warnings
sys.modules["ipywidgets"] = None

def forget_tqdm():
    for name in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")]:
        del sys.modules[name]

def tqdm_warnings(caught):
    return [str(w.message) for w in caught if type(w.message).__name__ == "TqdmWarning"]

forget_tqdm()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tqdm.auto                                  # the plain import, for comparison
control = tqdm_warnings(caught)
forget_tqdm()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import focuslens
    from focuslens.progress import tqdm as bar
    for _ in bar(range(3), desc="bar"):
        pass
    import tqdm.auto                                  # later importers (huggingface_hub, ...) stay quiet too
print(json.dumps({"control": control, "focuslens": tqdm_warnings(caught),
                  "bar": [c.__module__ for c in bar.__mro__]}))
"""


def run_in_kernel(source: str) -> tuple[dict, str]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def test_no_iprogress_warning_in_jupyter_without_ipywidgets():
    pytest.importorskip("nbclient")
    result, stderr = run_in_kernel(CELL)
    assert any("IProgress not found" in m for m in result["control"]), "this kernel should reproduce the warning"
    assert result["focuslens"] == []
    assert "IProgress" not in stderr
    assert "tqdm.std" in result["bar"] and "tqdm.notebook" not in result["bar"]  # text bars


def test_widget_bars_in_jupyter_with_ipywidgets():
    pytest.importorskip("nbclient")
    pytest.importorskip("ipywidgets")  # the [notebook] extra
    result, stderr = run_in_kernel(CELL.replace('sys.modules["ipywidgets"] = None', ""))
    assert result["focuslens"] == [] and "IProgress" not in stderr
    assert "tqdm.notebook" in result["bar"]
