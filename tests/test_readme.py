"""Every ```python block of README.md runs as pasted: in order, in one namespace, with its
one size knob turned down (``N = 100`` -> ``N = 4``), in a scratch folder."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SIZE = "N = 100 "


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_blocks_and_one_size_knob():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    assert sum(b.count(SIZE) for b in blocks) == 1  # the test turns exactly this line down


@pytest.mark.slow
def test_readme_python_blocks_run_as_pasted(tmp_path, monkeypatch, shared_data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FOCUSLENS_RELEASE", str(shared_data / "focus-direction-release"))
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no PNG", UserWarning)  # a machine without chromium: HTML only
        for i, block in enumerate(python_blocks(README.read_text()), 1):
            code = compile(block.replace(SIZE, "N = 4 "), f"README.md python block {i}", "exec")
            exec(code, namespace)  # noqa: S102 - the README's own code
    assert (tmp_path / "my_directions" / "focus_directions.json").exists()
    assert (tmp_path / "figures" / "tokens.html").exists()
    assert namespace["llama"].shape[0] == 28  # the released Llama-3.2-3B directions: 28 layers
