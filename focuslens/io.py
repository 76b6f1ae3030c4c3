"""Atomic writes: a result a user keeps is either the old file or the new one, never half.

* **One file** (:func:`write_atomic`): the bytes go to a temporary file beside the target,
  are flushed to disk, and the file is renamed over the target (``os.replace`` is atomic on
  one file system). A process killed at any moment leaves the previous file intact.
* **Several files as one unit** (:func:`write_unit`, :func:`check_unit`): directions, a run
  folder's tables and ``summary.json``, the model cache. Each new file is first written
  beside its target under a name carrying its hash (``.<name>.<sha256[:16]>.pending``);
  then ``manifest.json`` — every file's size and SHA-256 — is written atomically: that is
  the moment the save happens; then the pending files are renamed over their targets.
  A kill before the manifest leaves the old unit (the pending files are stale and are
  removed by the next save); a kill after it leaves a manifest whose pending files are
  still there, and the next load renames them into place (rolls forward). Every load
  checks each file's size and hash against the manifest and names the file that differs;
  a large file is hashed once and then trusted while its size and modification time are
  those of a stamp written beside it (``.<name>.verified``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

from focuslens.errors import DataError

__all__ = ["safetensors_header", "write_atomic", "write_json", "write_csv", "json_safe", "read_json", "parse_json",
           "read_summary", "update_summary", "update_run", "sha256_file", "MANIFEST", "RUN", "write_unit", "check_unit",
           "unit_manifest", "has_manifest", "file_entry", "file_problem", "json_bytes", "locked", "pid_alive"]

MANIFEST = "manifest.json"
RUN = "focuslens run"  # the kind of a run folder's unit (stage tables, artifacts, summary.json)
_UNIT_FORMAT = "focuslens unit 1"
_STAMPED = 16 << 20  # files above this size are hashed once, then trusted by a stamp (size, mtime)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created); returns the path."""
    path = Path(path)
    _make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def json_safe(obj):
    """``obj`` with every non-finite float as None, so the JSON is valid everywhere."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_bytes(obj, indent: int | None = None) -> bytes:
    """``obj`` as the bytes of a JSON file (NaN and ±inf as null)."""
    return (json.dumps(json_safe(obj), indent=indent) + "\n").encode()


def write_json(path: str | Path, obj, *, indent: int | None = None) -> Path:
    """:func:`write_atomic` of ``obj`` as JSON (NaN and ±inf written as null)."""
    return write_atomic(path, json_bytes(obj, indent))


def write_csv(path: str | Path, frame) -> Path:
    """:func:`write_atomic` of a DataFrame as CSV (no index)."""
    return write_atomic(path, frame.to_csv(index=False))


def update_summary(path: str | Path, section: str, data) -> dict:
    """Merge ``{section: data}`` (any JSON-able value) into the summary at ``path`` (created
    if missing) as part of its folder's unit (:func:`update_run`); returns the whole summary."""
    path = Path(path)
    return update_run(path.parent, {section: data}, summary=path.name)


def update_run(out_dir: str | Path, sections: Mapping[str, object], files: Mapping[str, bytes | str] | None = None,
               *, summary: str = "summary.json") -> dict:
    """Save ``files`` (path in ``out_dir`` -> content) and merge ``sections`` into the
    folder's ``summary.json``, all as one unit (:func:`write_unit`): a kill at any moment
    leaves the old tables under the old summary or the new under the new. Returns the summary."""
    out = Path(out_dir)
    with locked(out):  # two processes finishing at once both keep their sections
        merged = read_summary(out / summary) | dict(sections)
        write_unit(out, {**(files or {}), summary: json_bytes(merged, 2)}, kind=RUN, merge=True)
    return merged


def pid_alive(pid: int | str) -> bool:
    """Whether process ``pid`` on this host is running (a string that is not a number: no),
    for files a live process may still be writing."""
    if not str(pid).isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def locked(folder: str | Path):
    """An exclusive lock on ``folder`` (``flock`` on its ``.lock`` file, created with the
    folder) for a read-modify-write that other processes may do at the same time."""
    folder = Path(folder)
    _make_folder(folder)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path: str | Path, what: str):
    """The parsed JSON at ``path``; a ``DataError`` naming the file and ``what`` it should
    hold if it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read a {what} file ({e}).") from e


def parse_json(text: str | bytes, source: str | Path, what: str):
    """The parsed JSON ``text`` read from ``source`` (a file, or where in it: e.g. the header
    of a safetensors file); a ``DataError`` naming ``source`` and ``what`` it should hold
    if it is not JSON. :func:`read_json` for a whole file."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{source}: cannot read a {what} ({e}).") from e


def safetensors_header(path: str | Path) -> tuple[int, dict]:
    """``(data start, header)`` of a safetensors file: the 8-byte little-endian header length,
    then the JSON header (tensor name -> dtype, shape, data offsets). The one reader of the
    format's header (the model cache checks lengths with it, the streamed cache reads shards
    by position); a ``DataError`` naming the file when it is not a safetensors header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 27:
            raise DataError(f"{path}: no safetensors header (header length {n}).")
        header = parse_json(f.read(n), path, "safetensors header")
    if not isinstance(header, dict):
        raise DataError(f"{path}: the safetensors header is a {type(header).__name__}, not an object.")
    return 8 + n, header


def read_summary(path: str | Path) -> dict:
    """The summary at ``path`` (``{}`` when there is no file), checked against its folder's
    manifest when it has one; a ``DataError`` naming the file when it is damaged or not a
    readable JSON object (it is never silently replaced)."""
    path = Path(path)
    if has_manifest(path.parent, path.name):
        check_unit(path.parent, kind=RUN, names=[path.name])
    if not path.exists():
        return {}
    summary = read_json(path, "summary")
    if not isinstance(summary, dict):
        raise DataError(f"{path}: a summary file holds a JSON object of sections, not a {type(summary).__name__}.")
    return summary


# ------------------------------------------------------------------ units of several files
def _make_folder(folder: Path) -> None:
    """``folder`` and its parents, or a ``DataError`` naming the part of the path that is a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise DataError(f"cannot save under {folder}: {blocker} is a file, not a folder.") from None


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pending(path: Path, sha: str) -> Path:
    return path.with_name(f".{path.name}.{sha[:16]}.pending")


def unit_manifest(files: Mapping[str, dict], kind: str) -> bytes:
    """The bytes of a ``manifest.json``: ``files`` maps each path (relative to the unit's
    folder) to its ``{"size", "sha256"}``."""
    return json_bytes({"format": _UNIT_FORMAT, "kind": kind, "files": dict(sorted(files.items()))}, 1)


def file_entry(data: bytes) -> dict:
    """A manifest entry of ``data``: its size and SHA-256."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def has_manifest(root: str | Path, name: str | None = None) -> bool:
    """Whether ``root`` holds a unit manifest (that lists ``name``, when given)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    return name is None or name in _read_manifest(Path(root), None).get("files", {})


def _read_manifest(root: Path, kind: str | None) -> dict:
    path = root / MANIFEST
    blob = read_json(path, "unit manifest")
    files = blob.get("files") if isinstance(blob, dict) else None
    if not isinstance(blob, dict) or blob.get("format") != _UNIT_FORMAT or not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        raise DataError(f"{path} is not a focuslens manifest (format {_UNIT_FORMAT!r}: files -> size, sha256).")
    if kind is not None and blob.get("kind") != kind:
        raise DataError(f"{root} holds a {blob.get('kind')!r}, not a {kind!r}: use another folder.")
    return blob


def _roll_forward(root: Path, files: Mapping[str, dict]) -> None:
    """Rename every pending file the manifest names over its target (manifests of units
    nested in this one first, so that a nested unit never lists files older than itself)."""
    for rel in sorted(files, key=lambda r: Path(r).name != MANIFEST):
        target = root / rel
        pending = _pending(target, files[rel]["sha256"])
        if pending.is_file():
            os.replace(pending, target)


def _clear_stale(root: Path, files: Iterable[str]) -> None:
    """Remove pending files (of a save killed before its manifest) beside ``files``."""
    for folder in {(root / rel).parent for rel in files}:
        if folder.is_dir():
            for stale in folder.glob(".*.pending"):
                stale.unlink(missing_ok=True)


def write_unit(root: str | Path, files: Mapping[str, bytes | str], *, kind: str, merge: bool = False) -> dict:
    """Write ``files`` (path relative to ``root`` -> content) as one unit (module docstring):
    after a kill at any moment the folder loads as the old unit or the new one. ``merge``:
    keep the entries of files the old manifest lists and this save does not write (a run
    folder, where each stage saves its own files). A folder that holds another kind of unit
    is refused. Returns the manifest's ``files``."""
    root = Path(root)
    _make_folder(root)
    old = {}
    if (root / MANIFEST).is_file():
        old = _read_manifest(root, kind)["files"]
        _roll_forward(root, old)  # finish a save killed after its manifest
    blobs = {rel: data.encode() if isinstance(data, str) else bytes(data) for rel, data in files.items()}
    _clear_stale(root, [*blobs, *old])
    entries = {rel: file_entry(data) for rel, data in blobs.items()}
    for rel, data in blobs.items():
        write_atomic(_pending(root / rel, entries[rel]["sha256"]), data)
    listed = {**old, **entries} if merge else entries
    write_atomic(root / MANIFEST, unit_manifest(listed, kind))  # the commit point
    _roll_forward(root, entries)
    return listed


def check_unit(root: str | Path, *, kind: str, names: Iterable[str] | None = None) -> dict:
    """Check the files of the unit at ``root`` (those in ``names``, or all) against its
    manifest, after finishing a save that was killed after its manifest; returns the
    manifest's ``files``. A ``DataError`` names the manifest when it is missing or
    unreadable and the file that is missing or differs from it."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root / MANIFEST} is missing: {root} is not a whole focuslens {kind} "
                        "(or was saved by an older focuslens); save it again.")
    files = _read_manifest(root, kind)["files"]
    _roll_forward(root, files)
    for rel in files if names is None else names:
        if rel not in files:
            raise DataError(f"{root / MANIFEST} does not list {rel}: the file was not saved with this unit.")
        problem = file_problem(root / rel, files[rel])
        if problem:
            raise DataError(f"{root / rel}: {problem}; {MANIFEST} says {files[rel]['size']} bytes with sha256 "
                            f"{files[rel]['sha256'][:16]}…: the file was damaged or changed after it was saved. "
                            "Save it again.")
    return files


def file_problem(path: str | Path, entry: dict) -> str | None:
    """What differs between a file and its manifest entry (None: nothing). Files above 16 MiB
    are hashed once and then trusted while their stamp matches (module docstring)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if stat.st_size != entry["size"]:
        return f"{stat.st_size} bytes"
    stamp_file = path.with_name(f".{path.name}.verified")
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": entry["sha256"]}
    if stat.st_size > _STAMPED and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return None
        except (OSError, ValueError):
            pass
    if sha256_file(path) != entry["sha256"]:
        return "its sha256 differs"
    if stat.st_size > _STAMPED:
        try:
            write_atomic(stamp_file, json_bytes(stamp))
        except (OSError, DataError):
            pass  # a read-only folder: hashed again next time
    return None
