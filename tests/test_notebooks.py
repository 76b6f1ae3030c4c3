"""The analyses notebooks run top to bottom, headless, with small settings.

They are committed without outputs; here each one is executed in a fresh kernel
(``FOCUSLENS_NB_SMALL=1``: a few prompts per experiment) and must not raise.
"""

from __future__ import annotations

import json
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
