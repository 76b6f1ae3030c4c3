"""Fault injection: a process killed with SIGKILL in the middle of saving leaves an artifact
that still loads (the old one or the new one, never half of either, never a mixed pair)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

from focuslens.directions.artifact import FocusDirections
from focuslens.io import update_summary
from focuslens.measure.scoring import HeadScores
from focuslens.model import load as models

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# each child saves large artifacts in a loop, alternating two contents, until it is killed
CHILD = {
    "scores": """
        import torch, itertools
        from focuslens.measure.scoring import HeadScores
        for i in itertools.count():
            HeadScores(mean={"gold": torch.full((300, 300), float(i % 2))}, metadata={"i": i}).save(PATH)
            print(i, flush=True)
    """,
    "directions": """
        import torch, itertools
        from focuslens.directions.artifact import FocusDirections
        for i in itertools.count():
            v = torch.full((30, 9, 512), float(i % 2))
            FocusDirections(v, v, [(i % 2, 0)], {"i": i}).save(PATH)
            print(i, flush=True)
    """,
}


def _kill_mid_save(kind: str, path, delay: float) -> None:
    code = f"PATH = {str(path)!r}\n" + textwrap.dedent(CHILD[kind])
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    child.stdout.readline()  # one complete save exists
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.031, 0.07])
def test_scores_survive_a_kill_during_save(tmp_path, delay):
    path = tmp_path / "scores.json"
    _kill_mid_save("scores", path, delay)
    scores = HeadScores.load(path)  # loads: never a truncated file
    value = float(scores["gold"][0, 0])
    assert value in (0.0, 1.0) and bool((scores["gold"] == value).all())
    assert value == scores.metadata["i"] % 2  # tensors and metadata from the same save
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"] or all(
        p.name.startswith(".scores.json.") for p in tmp_path.iterdir() if p.name != "scores.json")


@pytest.mark.parametrize("delay", [0.0, 0.017, 0.043])
def test_directions_survive_a_kill_during_save(tmp_path, delay):
    path = tmp_path / "dirs"
    _kill_mid_save("directions", path, delay)
    try:
        dirs = FocusDirections.load(path)
    except Exception as err:  # the one allowed failure: a mixed pair, refused by its hash
        assert "sha256" in str(err)
        return
    value = float(dirs.q[0, 0, 0])
    assert bool((dirs.q == value).all()) and dirs.ranking == [(int(value), 0)]
    assert value == dirs.metadata["i"] % 2


# ---------------------------------------------------------------- summary.json and CSV tables
N_ROWS = 100_000
CHILD.update({
    "summary": f"""
        import itertools
        from focuslens.io import update_summary
        for i in itertools.count():
            update_summary(PATH, "stage", {{"i": i, "values": [i % 2] * {N_ROWS}}})
            print(i, flush=True)
    """,
    "csv": f"""
        import itertools
        import pandas as pd
        from focuslens.io import write_csv
        for i in itertools.count():
            write_csv(PATH, pd.DataFrame({{"i": [i] * {N_ROWS}, "value": [i % 2] * {N_ROWS}}}))
            print(i, flush=True)
    """,
})


def _only_temp_files_beside(path) -> bool:
    return all(p.name.startswith(f".{path.name}.") for p in path.parent.iterdir() if p != path)


@pytest.mark.parametrize("delay", [0.0, 0.023, 0.07])
def test_summary_survives_a_kill_during_update(tmp_path, delay):
    path = tmp_path / "summary.json"
    update_summary(path, "earlier", {"kept": True})  # another stage's section
    _kill_mid_save("summary", path, delay)
    summary = json.loads(path.read_text())  # valid JSON: never half a file
    stage = summary["stage"]
    assert summary["earlier"] == {"kept": True}  # the other sections survive every update
    assert len(stage["values"]) == N_ROWS and set(stage["values"]) == {stage["i"] % 2}  # one whole version
    assert _only_temp_files_beside(path)


@pytest.mark.parametrize("delay", [0.0, 0.031, 0.07])
def test_csv_survives_a_kill_during_write(tmp_path, delay):
    path = tmp_path / "table.csv"
    _kill_mid_save("csv", path, delay)
    frame = pd.read_csv(path)
    assert len(frame) == N_ROWS and list(frame.columns) == ["i", "value"]
    i = int(frame["i"].iloc[0])
    assert (frame["i"] == i).all() and (frame["value"] == i % 2).all()  # one whole version
    assert _only_temp_files_beside(path)


# ---------------------------------------------------------------- the embedded model's cache
# the child rebuilds the cache folder in a loop (deleting tokenizer.json breaks it each time),
# with a fake dequantizer that writes a small folder slowly, until it is killed
def fake_dequantize(name, folder):
    """Stands in for the ~65 s dequantization: a small folder, written slowly."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    time.sleep(0.01)
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": list(range(20000))}))
    time.sleep(0.01)
    save_file({"w": torch.arange(200_000, dtype=torch.float32)}, str(folder / "model.safetensors"))


CHILD["cache"] = """
import itertools, json, os, time
from pathlib import Path
import torch
import focuslens.model.load as models
""" + inspect.getsource(fake_dequantize) + """
os.environ["FOCUSLENS_CACHE"] = PATH
models._dequantize = fake_dequantize
for i in itertools.count():
    (Path(PATH) / "smollm2-135m-instruct" / "tokenizer.json").unlink(missing_ok=True)
    models._dequantized_dir("smollm2-135m-instruct")
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.035, 0.06])
def test_model_cache_survives_a_kill_during_rebuild(tmp_path, monkeypatch, delay):
    _kill_mid_save("cache", tmp_path, delay)
    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_dequantize", fake_dequantize)
    folder = models._dequantized_dir("smollm2-135m-instruct")  # the next load works
    assert models._cache_problem(folder) is None and (folder / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no .tmp / .old left behind
