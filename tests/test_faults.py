"""Fault injection: a process killed with SIGKILL in the middle of saving leaves an artifact
that still loads (the old one or the new one, never half of either, never a mixed pair)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from focuslens.directions.artifact import FocusDirections
from focuslens.errors import DataError
from focuslens.io import read_summary, update_summary
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
# (``.<name>.<pid>.tmp``) and the pending files of a unit's save killed before its manifest
# (``.<name>.<sha>.pending``, removed by the next save) may be left.
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
STAGE = """
import pandas as pd, torch
from focuslens.directions.artifact import FocusDirections
from focuslens.experiments.stages import StageResult
from focuslens.measure.scoring import HeadScores

def stage(i):
    v = torch.full((30, 9, 64), float(i))
    return StageResult("stage", {{"i": i}}, tables={{"table": pd.DataFrame({{"i": [i] * 1000}})}},
                       artifacts={{"scores": HeadScores(mean={{"gold": v[..., 0]}}, metadata={{"i": i}}),
                                   "dirs": FocusDirections(v, v, [(i, 0)], {{"i": i}})}})
"""
PROGRESS = """
from pathlib import Path
import torch
from focuslens.experiments.stages.long_context import _Progress
SETTINGS = {{"model": "m"}}

def row(i):
    return {{"task": "needle", "size": 2, "i": i}}, torch.full((3, 2, 2), float(i + 1))
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
    "progress": PROGRESS.format() + """
class Saving:
    def save(self, path):
        _Progress(Path(path), SETTINGS).add(*row(1))
new = Saving()
""",
    "stage": STAGE.format() + """
class Saving:
    def save(self, path):
        stage(1).save(path)
new = Saving()
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
    old = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code = KILLED_SAVE.format(build=NEW[kind], steps=STEPS)
    versions = []
    for kill_at in range(1, n_steps + 2):
        shutil.rmtree(folder)
        for rel, data in old.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        child = subprocess.Popen([sys.executable, "-c", code, str(kill_at), str(path)], stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, err[-2000:]
        versions.append(load())
        left = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} - set(old)
        assert all(re.fullmatch(rf"\..+\.({child.pid}\.tmp|[0-9a-f]{{16}}\.pending)", p.name) for p in left), \
            (kill_at, left)
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


def test_a_stage_survives_a_kill_at_every_step_of_save(tmp_path, monkeypatch):
    """A stage is its table, its artifacts (one a folder) and its summary section: after a kill
    at any step they load as one version, never new tables under an old summary."""
    from focuslens.experiments.stages import load_stage
    from focuslens.io import update_summary
    namespace = {}
    exec(STAGE.format(), namespace)
    path = tmp_path / "run"
    update_summary(path / "summary.json", "earlier", {"kept": True})  # another stage's section
    n_steps = _steps_of(lambda: namespace["stage"](0).save(path), monkeypatch)

    def load() -> int:
        alone = FocusDirections.load(path / "dirs")  # the nested folder alone, before the stage's load: whole
        assert alone.metadata["i"] in (0, 1) and torch.equal(alone.q, torch.full((30, 9, 64), alone.metadata["i"] * 1.0))
        got = load_stage(path, "stage")
        i = got.summary["i"]
        assert (got["table"]["i"] == i).all() and len(got["table"]) == 1000
        assert got["scores"].metadata["i"] == i and float(got["scores"]["gold"][0, 0]) == i
        assert got["dirs"].metadata["i"] == i and got["dirs"].top_k(1) == [(i, 0)]
        assert FocusDirections.load(path / "dirs").metadata["i"] == i
        assert read_summary(path / "summary.json")["earlier"] == {"kept": True}
        return i

    versions = _kill_at_every_step("stage", path, n_steps, load)
    assert 0 in versions and 1 in versions


def test_long_context_progress_survives_a_kill_at_every_step_of_a_prompt(tmp_path, monkeypatch):
    """The rows and the slot-mass sums are one unit: a kill never leaves sums that count a
    prompt the rows do not list (it would be counted twice on resume)."""
    namespace = {}
    exec(PROGRESS.format(), namespace)
    progress, row = namespace["_Progress"], namespace["row"]
    path = tmp_path / "progress"
    n_steps = _steps_of(lambda: progress(path, namespace["SETTINGS"]).add(*row(0)), monkeypatch)

    def load() -> int:
        got = progress(path, namespace["SETTINGS"])
        done = len(got.rows) - 1
        assert [r["i"] for r in got.rows] == list(range(done + 1))
        assert torch.equal(got.sums["needle_2"], torch.full((3, 2, 2), float(sum(i + 1 for i in range(done + 1)))))
        return done

    _kill_at_every_step("progress", path, n_steps, load)


def test_a_stage_table_cut_mid_row_is_named_not_loaded_short(tmp_path, capsys):
    from focuslens.experiments.cli import main
    from focuslens.experiments.stages import load_stage
    namespace = {}
    exec(STAGE.format(), namespace)
    namespace["stage"](0).save(tmp_path)
    table = tmp_path / "table.csv"
    table.write_bytes(table.read_bytes()[:-7])  # cut mid-row: it would parse as a shorter table
    assert len(pd.read_csv(table)) < 1000
    with pytest.raises(DataError, match=r"table.csv: \d+ bytes; manifest.json says"):
        load_stage(tmp_path, "stage")
    assert main(["figures", "--model", "no-such-model", "--out", str(tmp_path)]) == 2  # nothing redrawn from it
    assert "table.csv" in capsys.readouterr().err
    (tmp_path / "manifest.json").unlink()  # a run folder of an older focuslens: the cut still shows
    with pytest.raises(DataError, match=r"table.csv ends mid-row"):
        load_stage(tmp_path, "stage")


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
        from focuslens.io import read_summary, update_summary
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
    """Beside ``path`` only its temporary and pending files, its unit's manifest (and its
    temporary file) and the folder's lock (:func:`focuslens.io.locked`)."""
    return all(p.name.startswith((f".{path.name}.", ".manifest.json.")) for p in path.parent.iterdir()
               if p not in (path, path.parent / "manifest.json", path.parent / ".lock"))


@pytest.mark.parametrize("delay", [0.0, 0.023, 0.07])
def test_summary_survives_a_kill_during_update(tmp_path, delay):
    path = tmp_path / "summary.json"
    update_summary(path, "earlier", {"kept": True})  # another stage's section
    _kill_mid_save("summary", path, delay)
    summary = read_summary(path)  # checked against the manifest (a save killed after it is finished)
    assert json.loads(path.read_text()) == summary  # valid JSON: never half a file
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


# ---------------------------------------------------------------- NaN refused where it enters
def _nan_model():
    """A tiny model loaded whole, then one weight of layer 0's query set to NaN in memory
    (after load_model's check of the weights: what an in-place edit does)."""
    from focuslens.model.testing import tiny_model
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, seed=0)
    with torch.no_grad():
        model.original_model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    return model


def _recorded(fl, model, prompt):
    with fl.record(model, "all", prompt=prompt) as rec:
        model(prompt.input_ids[None], stop_at_layer=1)  # the recorder's own check (no final norm here)
    return rec


ENTRY_POINTS = {
    "score_heads": lambda fl, m, ex: fl.score_heads(m, ex, quiet=True),
    "train_directions": lambda fl, m, ex: fl.train_directions(m, ex[:3], ex[3:], epochs=1, quiet=True),
    "patch_heads": lambda fl, m, ex: fl.causal.patch_heads(m, fl.causal.make_counterfactual_pairs(m, ex[:2]),
                                                           heads=[(1, 0)], quiet=True),
    "ablate_heads": lambda fl, m, ex: fl.causal.ablate_heads(m, ex[:2], heads=[(1, 0)], mode="zero", quiet=True),
    "record": lambda fl, m, ex: _recorded(fl, m, fl.render(ex[0], m.tokenizer)),
    "evaluate": lambda fl, m, ex: fl.evaluate_next_token(m, ex[:2], quiet=True),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_nan_weight_is_refused_at_every_entry_point(entry):
    import focuslens as fl
    from focuslens.errors import NonFiniteError
    model = _nan_model()
    examples = fl.make_synthetic_qa(5, n_documents=3, seed=0)
    with pytest.raises(NonFiniteError, match=r"NaN or inf \(the first at index"):
        ENTRY_POINTS[entry](fl, model, examples)


def test_load_model_names_a_nan_weight():
    from focuslens.errors import NonFiniteError
    from focuslens.model.load import load_model
    from focuslens.model.testing import tiny_model
    hf = tiny_model("llama", n_heads=4, n_kv_heads=2, seed=0).original_model
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the model's weight model\.layers\.1\.mlp\.up_proj\.weight: 1 of \d+ values are NaN or inf"):
        load_model(hf, tokenizer=tiny_model("llama").tokenizer)


# ---------------------------------------------------------------- units: hashes, stamps, stale files
def test_a_large_file_is_hashed_once_then_trusted_by_its_stamp_until_it_changes(tmp_path, monkeypatch):
    import focuslens.io as io
    big = os.urandom(1024) * (17 * 1024)  # 17 MiB: above the stamped size
    io.write_unit(tmp_path, {"big.bin": big, "small.txt": "x"}, kind="test")
    hashed = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    io.check_unit(tmp_path, kind="test")
    io.check_unit(tmp_path, kind="test")
    assert hashed.count("big.bin") == 1 and hashed.count("small.txt") == 2  # small files: every time
    path = tmp_path / "big.bin"
    with open(path, "r+b") as f:  # NaN bytes at the same size
        f.seek(len(big) // 2)
        f.write(b"\x00\x00\xc0\x7f")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"big\.bin: its sha256 differs; manifest.json says"):
        io.check_unit(tmp_path, kind="test")


def test_a_unit_refuses_another_kind_and_a_path_under_a_file(tmp_path):
    import focuslens.io as io
    FocusDirections(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), [], {}).save(tmp_path / "dirs")
    with pytest.raises(DataError, match=r"holds a 'focus directions', not a 'focuslens run'"):
        io.update_summary(tmp_path / "dirs" / "summary.json", "stage", {})
    (tmp_path / "file").write_text("a file")
    with pytest.raises(DataError, match=r"cannot save under .*file/dirs: .*file is a file, not a folder"):
        FocusDirections(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), [], {}).save(tmp_path / "file" / "dirs")
    with pytest.raises(DataError, match=r"file is a file"):
        HeadScores(mean={"gold": torch.zeros(2, 2)}).save(tmp_path / "file" / "scores.json")


def test_stale_pending_files_are_removed_by_the_next_save(tmp_path):
    import focuslens.io as io
    io.write_unit(tmp_path, {"a.txt": "old"}, kind="test")
    (tmp_path / ".a.txt.0123456789abcdef.pending").write_text("a save killed before its manifest")
    io.write_unit(tmp_path, {"a.txt": "new"}, kind="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "manifest.json"]
    assert (tmp_path / "a.txt").read_text() == "new"
