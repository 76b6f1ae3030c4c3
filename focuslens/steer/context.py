"""What an intervention's candidate settings are built from in a methods comparison.

:meth:`~focuslens.model.intervention.Intervention.candidates` receives a
:class:`MethodContext`: the model, the head ranking the labelled methods act on and its k,
trained focus directions, the rows the comparison steers, and calibration prompts (never
test prompts) with the positional profiles measured on them, computed once per context
(and kept in ``cache_dir`` when given, so a resumed or parallel run measures them once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from focuslens.io import read_json, write_json
from focuslens.measure.position import PositionProfile, position_profile

__all__ = ["MethodContext"]


@dataclass
class MethodContext:
    """Fields a method does not use may be None. ``rows``: where the methods that can act on
    some rows only do (``"all"``, or ``"answer"``: one prefill per prompt serves them all)."""

    model: object
    ranking: object = None
    k: int = 20
    directions: object = None
    calibration: Sequence = field(default_factory=list)
    rows: str = "all"
    seed: int = 0
    cache_dir: str | Path | None = None
    _profiles: dict = field(default_factory=dict, repr=False)

    def profile(self, content_free: bool = True) -> PositionProfile:
        """The positional profile of :attr:`calibration` (content-free documents, or the real
        ones), measured on the first ask."""
        if content_free not in self._profiles:
            path = Path(self.cache_dir) / f"profile_{'content_free' if content_free else 'real'}.json" \
                if self.cache_dir else None
            if path is not None and path.is_file():
                blob = read_json(path, "a positional profile")
                self._profiles[content_free] = PositionProfile(torch.tensor(blob["mass"]), torch.tensor(blob["per_token"]),
                                                               blob["metadata"])
            else:
                prof = position_profile(self.model, self.calibration, content_free=content_free, quiet=True)
                if path is not None:
                    write_json(path, {"mass": prof.mass.tolist(), "per_token": prof.per_token.tolist(),
                                      "metadata": prof.metadata})
                self._profiles[content_free] = prof
        return self._profiles[content_free]
