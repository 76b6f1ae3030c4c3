"""The demo's stages. Each runs one experiment and returns a :class:`StageResult` in memory.

A stage prints its table and returns what it found: the ``summary`` (every number it
prints; its ``summary.json`` section), its tables (DataFrames) and its artifacts
(:class:`~focuslens.measure.scoring.HeadScores`, :class:`~focuslens.causal.patching.PatchingResult`,
:class:`~focuslens.directions.artifact.FocusDirections`). Later stages and the figures take these
objects as arguments; nothing is read back from disk. :meth:`StageResult.save` writes them
for the user to keep, and :func:`load_stage` reads a saved stage back (``make figures``).

>>> scores = run_contextual_heads(model, n_prompts=20)["contextual_heads"]   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from focuslens.causal.patching import PatchingResult
from focuslens.directions.artifact import UNIT_KIND, FocusDirections
from focuslens.errors import DataError
from focuslens.io import MANIFEST, RUN, check_unit, file_entry, has_manifest, read_summary, unit_manifest, update_run
from focuslens.measure.scoring import HeadScores

__all__ = ["StageResult", "load_stage"]


@dataclass
class StageResult:
    """What one stage found, in memory.

    Attributes:
        section: its name (the ``summary.json`` section).
        summary: every number it prints (JSON-safe).
        tables: name -> DataFrame, saved as ``{name}.csv``.
        artifacts: name -> a result with ``save``/``load`` (saved as ``{name}.json``, or a
            folder ``{name}/`` for focus directions).
        objects: in-memory extras that are not saved (e.g. the rendered prompt).
    """

    section: str
    summary: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str):
        for part in (self.tables, self.artifacts, self.objects):
            if name in part:
                return part[name]
        raise KeyError(f"stage {self.section!r} has no {name!r}; it has "
                       f"{[*self.tables, *self.artifacts, *self.objects]}")

    def save(self, out_dir: str | Path) -> dict:
        """Write the tables, the artifacts and the ``summary.json`` section as one unit of
        the run folder (:func:`focuslens.io.write_unit`: a save killed at any moment leaves
        the old stage or the new one); the section lists the files under ``"files"``.
        Returns the summary."""
        files, content = {}, {}
        for name, frame in self.tables.items():
            index = [n for n in frame.index.names if n is not None]
            content[f"{name}.csv"] = frame.to_csv(index=bool(index))
            files[name] = {"kind": "table", "index": index}
        for name, artifact in self.artifacts.items():
            kind = type(artifact).__name__
            if kind == "FocusDirections":  # a folder: its files and its own manifest, in this unit
                own = artifact.files()
                content |= {f"{name}/{rel}": data for rel, data in own.items()}
                content[f"{name}/{MANIFEST}"] = unit_manifest({rel: file_entry(d) for rel, d in own.items()}, UNIT_KIND)
            else:
                content[f"{name}.json"] = artifact.to_json()
            files[name] = {"kind": kind}
        return update_run(out_dir, {self.section: {**self.summary, "files": files}}, content)


def _loaders() -> dict:
    return {"HeadScores": lambda p: HeadScores.load(p.with_suffix(".json")),
            "PatchingResult": lambda p: PatchingResult.load(p.with_suffix(".json")),
            "FocusDirections": FocusDirections.load}


def load_stage(out_dir: str | Path, section: str) -> StageResult:
    """A stage saved by :meth:`StageResult.save` under ``out_dir``, read back."""
    out = Path(out_dir)
    path = out / "summary.json"
    summary = read_summary(path)
    if section not in summary:
        raise DataError(f"{path} has no {section!r} section: run `make demo` (or the stage that writes it) first.")
    if not isinstance(summary[section], dict):
        raise DataError(f"{path}: section {section!r} is a {type(summary[section]).__name__}, not an object.")
    summary = dict(summary[section])
    if "files" not in summary:
        raise DataError(f"{path}: section {section!r} lists no files (written by an older focuslens?): "
                        "run `make demo` again.")
    files = _file_specs(path, section, summary.pop("files"))
    if has_manifest(out):  # every file of the stage as saved: a cut or edited one is named
        listed = check_unit(out, kind=RUN, names=[])
        check_unit(out, kind=RUN, names=[rel for rel in listed for name in files
                                         if rel.split("/")[0] in (name, f"{name}.csv", f"{name}.json")])
    result, loaders = StageResult(section, summary), _loaders()
    for name, spec in files.items():
        target = out / name
        if spec["kind"] == "table":
            result.tables[name] = _read_table(target.with_suffix(".csv"), spec["index"])
        else:
            result.artifacts[name] = loaders[spec["kind"]](target)
    return result


def _file_specs(path: Path, section: str, files) -> dict:
    """The ``"files"`` of a section, checked: name -> ``{"kind": ...}`` with a known kind
    (a table also has its ``"index"`` columns)."""
    kinds = ["table", *_loaders()]
    if not isinstance(files, dict):
        raise DataError(f"{path}: section {section!r}: \"files\" is a {type(files).__name__}, not an object.")
    for name, spec in files.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in kinds or (kind == "table" and not isinstance(spec.get("index"), list)):
            raise DataError(f"{path}: section {section!r}: files[{name!r}] = {spec!r} is not one of the kinds "
                            f"{kinds} (a table with its \"index\" list).")
    return files


def _read_table(csv: Path, index: list) -> pd.DataFrame:
    """A table saved by :meth:`StageResult.save`; a ``DataError`` naming the CSV when it is
    missing or unreadable."""
    if not csv.exists():
        raise DataError(f"{csv} is missing: run `make demo` (or the stage that writes it) first.")
    with open(csv, "rb") as f:  # a folder without a manifest (an older run): a cut file still shows
        f.seek(max(csv.stat().st_size - 1, 0))
        if f.read(1) not in (b"\n", b""):
            raise DataError(f"{csv} ends mid-row (a cut file; every saved table ends with a newline): run the "
                            "stage again.")
    try:
        frame = pd.read_csv(csv, keep_default_na=False, na_values=[""])  # text "NA" / "None" stays text
        frame.columns = [int(c) if c.isdigit() else c for c in frame.columns]  # token positions
        return frame.set_index(index) if index else frame
    except (OSError, ValueError, KeyError) as e:  # pandas' parser errors are ValueErrors
        raise DataError(f"{csv}: cannot read a saved table ({type(e).__name__}: {e}): run the stage again.") from e
