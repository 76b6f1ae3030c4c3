"""Atomic writes: a result a user keeps is either the old file or the new one, never half.

Each writer puts the bytes in a temporary file beside the target, flushes them to disk and
renames the file over the target (``os.replace`` is atomic on one file system). A process
killed at any moment leaves the previous artifact intact. Artifacts of several files tie
them together with a content hash that their loader checks
(:meth:`focuslens.directions.artifact.FocusDirections.save`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from focuslens.errors import DataError

__all__ = ["safetensors_header", "write_atomic", "write_json", "write_csv", "json_safe", "read_json", "parse_json", "read_summary",
           "update_summary"]


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def write_json(path: str | Path, obj, *, indent: int | None = None) -> Path:
    """:func:`write_atomic` of ``obj`` as JSON (NaN and ±inf written as null)."""
    return write_atomic(path, json.dumps(json_safe(obj), indent=indent) + "\n")


def write_csv(path: str | Path, frame) -> Path:
    """:func:`write_atomic` of a DataFrame as CSV (no index)."""
    return write_atomic(path, frame.to_csv(index=False))


def update_summary(path: str | Path, section: str, data) -> dict:
    """Merge ``{section: data}`` (any JSON-able value) into the JSON file at ``path``
    (created if missing), atomically; returns the whole summary."""
    path = Path(path)
    summary = read_summary(path)
    summary[section] = data
    write_json(path, summary, indent=2)
    return summary


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
    """The summary at ``path`` (``{}`` when there is no file); a ``DataError`` naming the
    file when it is not a readable JSON object (it is never silently replaced)."""
    path = Path(path)
    if not path.exists():
        return {}
    summary = read_json(path, "summary")
    if not isinstance(summary, dict):
        raise DataError(f"{path}: a summary file holds a JSON object of sections, not a {type(summary).__name__}.")
    return summary
