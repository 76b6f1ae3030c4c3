"""The ``focuslens`` command: errors exit 2 with a message, distraction writes its outputs."""

from __future__ import annotations

import json
import re

import pytest

from focuslens.cli import main


def test_unknown_model_exits_2_and_names_the_spec(capsys):
    assert main(["info", "--model", "not-a-model"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("focuslens: error:")
    assert "'not-a-model'" in captured.err and captured.out == ""


def test_info_prints_the_shape(capsys, tiny_llama_dir):
    assert main(["info", "--model", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{tiny_llama_dir.name}: 2 layers, 4 heads, 2 KV heads, d_head 16, n_ctx" in out


def test_bad_arguments_exit_through_argparse(capsys):
    with pytest.raises(SystemExit) as err:
        main(["distraction", "--n-prompts", "many"])
    assert err.value.code == 2 and "--n-prompts" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:no PNG")
def test_distraction_writes_summary_and_offline_html(tmp_path, tiny_llama_dir, capsys):
    argv = ["distraction", "--model", str(tiny_llama_dir), "--n-prompts", "3", "--n-documents", "1", "3"]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    section = summary["distraction"]
    assert section["model"] == tiny_llama_dir.name and section["task"] == "synthetic" and section["seed"] == 0
    assert section["n_prompts"] == 3
    assert set(section["accuracy"]) == set(section["candidate_accuracy"]) == {"1", "3"}
    assert section["candidate_accuracy"]["1"] == 1.0  # one document: no competing candidate
    assert all(0.0 <= a <= 1.0 for a in section["accuracy"].values())
    assert set(section["by_gold_position_3"]) == {"first", "middle", "last"}

    html = (tmp_path / "distraction.html").read_text()
    assert "<html" in html and len(html) > 1_000_000  # plotly.js is inlined
    assert not re.search(r"<script[^>]*\bsrc=[\"']?(https?:)?//", html)
    csv = (tmp_path / "distraction.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 * 2 + 3 * 3  # header, 2 random settings, 3 positions
    out = capsys.readouterr().out
    assert "Distraction table (3 prompts per row" in out
