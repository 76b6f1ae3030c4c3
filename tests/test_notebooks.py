"""The analyses notebooks run top to bottom, headless, with small settings.

They are committed without outputs; here each one is executed in a fresh kernel
(``FOCUSLENS_NB_SMALL=1``: a few prompts per experiment) and must not raise. Each says at
its top how to run small and after its results what to look for; tools/render_notebooks.py
(``make figures``) turns them into static HTML with PNG plots.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
NOTEBOOKS = sorted(ANALYSES.glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert len(NOTEBOOKS) >= 3
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code, path.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_headless(path, shared_data_or_none, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("FOCUSLENS_NB_SMALL", "1")
    monkeypatch.setenv("FOCUSLENS_RESULTS", str(tmp_path))  # never read the demo's results here
    release = shared_data_or_none and shared_data_or_none / "focus-direction-release"
    monkeypatch.setenv("FOCUSLENS_RELEASE", str(release or tmp_path / "no-release"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ANALYSES)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.fixture
def shared_data_or_none():
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


def test_notebooks_say_how_to_run_small_and_what_to_look_for():
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        assert "FOCUSLENS_NB_SMALL=1" in "".join(cells[0]["source"]), f"{path.name}: no small-mode note at the top"
        markdown = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
        assert sum(m.startswith("**What to look for:**") for m in markdown) >= 3, path.name
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "QUIET = SMALL" in code and "quiet=True" not in code, f"{path.name}: progress bars outside small mode"


# ------------------------------------------------------------------ tools/render_notebooks.py
def _render_tool():
    import importlib.util

    pytest.importorskip("nbconvert")
    spec = importlib.util.spec_from_file_location("render_notebooks", ANALYSES.parent / "tools" / "render_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _figure_notebook():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# bars"),
                nbformat.v4.new_code_cell("import plotly.graph_objects as go\n"
                                          "go.Figure(go.Bar(y=[1, 2]), layout_title_text='Two <b>bars</b>, x < 3')")]
    return nb


def test_render_without_png_embeds_interactive_figures_and_alt_texts():
    import nbformat

    tool = _render_tool()
    nb = _figure_notebook()
    fig = {"data": [{"type": "bar", "y": [1, 2]}], "layout": {"title": {"text": "Two <b>bars</b>, x < 3"}}}
    nb.cells[1].outputs = [nbformat.v4.new_output("display_data", data={tool.PLOTLY: fig})]
    assert tool.add_images(nb, png=False) == {}
    assert "text/html" in nb.cells[1].outputs[0].data and "image/png" not in nb.cells[1].outputs[0].data
    assert tool.title_of(fig) == "Two bars , x < 3"
    page = '<img alt="No description" class="" src="data:image/png;base64,QUJD"'
    assert tool.with_alt_text(page, {"QUJD": 'a "b"'}) == '<img src="data:image/png;base64,QUJD" alt="a &quot;b&quot;" class=""'


@pytest.mark.slow
def test_render_writes_static_html_with_png_plots(tmp_path, monkeypatch):
    import nbformat

    tool = _render_tool()
    if not tool.png_export_available():
        pytest.skip("PNG export needs kaleido and Chromium")
    monkeypatch.setenv("FOCUSLENS_NB_SMALL", "0")  # restored after the test (render sets it)
    path = tmp_path / "bars.ipynb"
    nbformat.write(_figure_notebook(), path)
    seconds, n_png, n_html = tool.render(path, tmp_path, small=True, png=True, timeout=300)
    page = (tmp_path / "bars.html").read_text()
    assert (n_png, n_html) == (1, 0) and seconds > 0
    assert '<img src="data:image/png;base64,' in page and 'alt="Two bars , x &lt; 3"' in page
    assert "small mode" in page and re.search(r"In\W\[1\]:", page)  # the injected setup cell is not counted
    assert nbformat.read(path, as_version=4).cells[1].outputs == []  # the notebook itself is not written
