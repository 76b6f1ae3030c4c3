"""Fault injection: a process killed with SIGKILL in the middle of saving leaves an artifact
that still loads (the old one or the new one, never half of either, never a mixed pair)."""

from __future__ import annotations

import inspect
import json
import os
import re
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

# ---------------------------------------------------------------- one-file and two-file artifacts
# Killed at every step of a save, not at a moment left to chance: the test saves the old
# artifact and counts the file-system steps that save takes (os.fsync, os.replace, os.rename);
# a child then saves the new artifact and kills itself (SIGKILL) just before step n, for each
# n, and once just after the last step. Each time the artifact must load as the old one or
# the new one, compared value by value: never an error, never a mix. A kill before the first
# step leaves the old one, a kill after the last the new one, and once a kill point shows the
# new one every later one does. Beside the artifact only the killed child's temporary files
# (``.<name>.<pid>.tmp``) may be left.
STEPS = ("fsync", "replace", "rename")
KILLED_SAVE = """
import os, signal, sys
KILL_AT, PATH, calls = int(sys.argv[1]), sys.argv[2], 0

def step(fn):
    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped
{build}
for name in {steps!r}:
    setattr(os, name, step(getattr(os, name)))
new.save(PATH)
os.kill(os.getpid(), signal.SIGKILL)  # just after the last step
"""
NEW = {  # the new version (1) of each artifact; the test saves the old one (0)
    "scores": """
import torch
from focuslens.measure.scoring import HeadScores
new = HeadScores(mean={"gold": torch.full((300, 300), 1.0)}, metadata={"i": 1})
""",
    "directions": """
import torch
from focuslens.directions.artifact import FocusDirections
v = torch.full((30, 9, 512), 1.0)
new = FocusDirections(v, v, [(1, 0)], {"i": 1})
""",
}


def _steps_of(save, monkeypatch) -> int:
    """How many fsync/replace/rename calls one ``save()`` makes."""
    calls = []

    def counting(real):
        def wrapped(*args, **kwargs):
            calls.append(real.__name__)
            return real(*args, **kwargs)
        return wrapped

    with monkeypatch.context() as m:
        for name in STEPS:
            m.setattr(os, name, counting(getattr(os, name)))
        save()
    return len(calls)


def _kill_at_every_step(kind: str, path, n_steps: int, load) -> list[int]:
    """The version ``load()`` finds after a kill before each step 1..n and after the last,
    each time from the old artifact on disk."""
    folder = path if path.is_dir() else path.parent
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    code = KILLED_SAVE.format(build=NEW[kind], steps=STEPS)
    versions = []
    for kill_at in range(1, n_steps + 2):
        for p in folder.iterdir():
            p.unlink()
        for name, data in old.items():
            (folder / name).write_bytes(data)
        child = subprocess.Popen([sys.executable, "-c", code, str(kill_at), str(path)], stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, err[-2000:]
        versions.append(load())
        left = {p.name for p in folder.iterdir()} - set(old)
        assert all(re.fullmatch(rf"\..+\.{child.pid}\.tmp", n) for n in left), (kill_at, left)
    assert versions[0] == 0 and versions[-1] == 1, versions  # killed before any step: old; after all: new
    assert versions == sorted(versions), versions  # once the new version shows, it stays
    return versions


def test_scores_survive_a_kill_at_every_step_of_save(tmp_path, monkeypatch):
    path = tmp_path / "scores.json"
    old = HeadScores(mean={"gold": torch.full((300, 300), 0.0)}, metadata={"i": 0})
    n_steps = _steps_of(lambda: old.save(path), monkeypatch)
    assert n_steps >= 2  # at least the temporary file's fsync and its rename over the target

    def load() -> int:
        scores = HeadScores.load(path)  # never an error: the old file or the new one, whole
        i = scores.metadata["i"]
        torch.testing.assert_close(scores["gold"], torch.full((300, 300), float(i)), rtol=0, atol=0)
        return i

    _kill_at_every_step("scores", path, n_steps, load)


def test_directions_survive_a_kill_at_every_step_of_save(tmp_path, monkeypatch):
    path = tmp_path / "dirs"
    v = torch.full((30, 9, 512), 0.0)
    n_steps = _steps_of(lambda: FocusDirections(v, v, [(0, 0)], {"i": 0}).save(path), monkeypatch)

    def load() -> int:
        dirs = FocusDirections.load(path)  # never an error: the old pair or the new one
        i = dirs.metadata["i"]
        assert torch.equal(dirs.q, torch.full((30, 9, 512), float(i))) and torch.equal(dirs.k, dirs.q)
        assert dirs.top_k(1) == [(i, 0)]  # the ranking from the same save as the tensors
        return i

    _kill_at_every_step("directions", path, n_steps, load)


# ---------------------------------------------------------------- summary.json and CSV tables
# each child writes large files in a loop, alternating two contents, until it is killed
def _kill_mid_save(kind: str, path, delay: float) -> None:
    code = f"PATH = {str(path)!r}\n" + textwrap.dedent(CHILD[kind])
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    child.stdout.readline()  # one complete save exists
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()


N_ROWS = 100_000
CHILD = {
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
}


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
