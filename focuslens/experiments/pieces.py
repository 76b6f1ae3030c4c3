"""A long loop over prompts that a kill does not undo: results saved piece by piece.

:class:`Pieces` runs a function over consecutive pieces of a list of items (a few prompts
each) and saves each piece's result table as it finishes (one atomic CSV per piece,
``piece_00012.csv``). A rerun with the same identity (what the caller says the results
depend on: settings, a fingerprint of the items and of the model or directions; kept in ``meta.json``) loads the finished pieces and runs only the rest; another identity
is refused by name instead of mixing two runs. Every piece's seconds are kept, so the total
cost of a run spread over several invocations is known (:meth:`Pieces.seconds`).

Several processes may run the same pieces at once (start the same command twice to use
two cores with one thread each): a process claims a piece before running it
(``piece_00012.claim``, created exclusively, naming its host and pid), skips pieces that
another live process claimed, waits at the end for those to be written, and takes over
the claim of a process that died (a killed worker's piece is run again, not lost).
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from focuslens.errors import DataError
from focuslens.io import locked, pid_alive, read_json, write_atomic, write_json
from focuslens.progress import tqdm

__all__ = ["Pieces"]


class Pieces:
    """Results of ``fn(items[a:b], a)`` for consecutive pieces of ``size`` items, saved in
    ``folder`` as they finish (module docstring)."""

    #: seconds between looks at the pieces other processes are running
    poll: float = 5.0

    def __init__(self, folder: str | Path, identity: dict, *, size: int = 8):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DataError(f"size={size!r} must be an integer of at least 1.")
        self.folder, self.size = Path(folder), size
        self.identity = json.loads(json.dumps(identity | {"piece_size": size}))
        meta = self.folder / "meta.json"
        if meta.is_file():
            saved = read_json(meta, "a resumable run's meta.json")
            for key in sorted(set(saved["identity"]) | set(self.identity)):
                if saved["identity"].get(key) != self.identity.get(key):
                    raise DataError(f"{self.folder} holds a run with {key}={saved['identity'].get(key)!r}, not "
                                    f"{self.identity.get(key)!r}: delete it or use another folder.")
        elif self.folder.is_dir() and any(self.folder.glob("piece_*.csv")):
            raise DataError(f"{self.folder} holds pieces but no meta.json saying what they are of: delete the folder.")
        else:
            write_json(meta, {"identity": self.identity, "seconds": {}}, indent=1)

    def _path(self, p: int) -> Path:
        return self.folder / f"piece_{p:05d}.csv"

    def _claim_path(self, p: int) -> Path:
        return self.folder / f"piece_{p:05d}.claim"

    def _claim(self, p: int) -> bool:
        """Claim piece ``p`` for this process; False if another live process holds it. A
        claim left by a dead process on this host is taken over."""
        path, me = self._claim_path(p), f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _alive(path):
                    return False
                path.unlink(missing_ok=True)  # its process died: the piece is ours to redo
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            if self._path(p).is_file():  # finished by another process meanwhile
                path.unlink(missing_ok=True)
                return False
            return True
        return False

    def _seconds(self) -> dict:
        return read_json(self.folder / "meta.json", "a resumable run's meta.json").get("seconds", {})

    def seconds(self) -> float:
        """Seconds spent on the finished pieces, over every invocation."""
        return float(sum(self._seconds().values()))

    def run(self, items: Sequence, fn: Callable[[Sequence, int], pd.DataFrame], *, desc: str = "pieces",
            quiet: bool = False) -> pd.DataFrame:
        """Every piece's table, concatenated in order (finished pieces read from disk; pieces
        another live process claimed are waited for, polling every ``poll`` seconds)."""
        n = -(-len(items) // self.size)

        def finished() -> int:
            return sum(min(self.size, len(items) - p * self.size) for p in range(n) if self._path(p).is_file())

        bar = tqdm(total=len(items), initial=finished(), desc=desc, disable=quiet, leave=False)
        while missing := [p for p in range(n) if not self._path(p).is_file()]:
            p = next((p for p in missing if self._claim(p)), None)
            if p is None:  # every missing piece is another process's: wait for them
                time.sleep(self.poll)
            else:
                try:
                    t0 = time.perf_counter()
                    start = p * self.size
                    table = fn(items[start : start + self.size], start)
                    write_atomic(self._path(p), table.to_csv(index=False))
                    with locked(self.folder):
                        seconds = self._seconds() | {str(p): time.perf_counter() - t0}
                        write_json(self.folder / "meta.json", {"identity": self.identity, "seconds": seconds},
                                   indent=1)
                finally:
                    self._claim_path(p).unlink(missing_ok=True)
            bar.n = finished()
            bar.refresh()
        bar.close()
        return pd.concat([self._read(p) for p in range(n)], ignore_index=True)

    def _read(self, p: int) -> pd.DataFrame:
        text = self._path(p).read_text()
        if not text.endswith("\n"):
            raise DataError(f"{self._path(p)} ends mid-row: delete it to run that piece again.")
        strings = {c: str for c in ("prediction", "qid") if c in text.split("\n", 1)[0].split(",")}
        return pd.read_csv(io.StringIO(text), dtype=strings)  # an answer "07" stays text


def _alive(claim: Path) -> bool:
    """Whether the process named in a claim file may still be running (one on another host,
    or a claim being written, counts as alive)."""
    try:
        host, pid = claim.read_text().split()
    except FileNotFoundError:
        return False
    except ValueError:  # being written, or left empty by a process killed while creating it
        try:
            return time.time() - claim.stat().st_mtime < 60
        except FileNotFoundError:
            return False
    return host != socket.gethostname() or pid_alive(pid)
