"""One base class for per-head results: a ``[n_layers, n_heads]`` tensor per name.

:class:`~focuslens.scoring.HeadScores` (names are metrics: ``"gold"``, ``"sink"``, …) and
:class:`~focuslens.patching.PatchingResult` (names are methods: ``"exact"``,
``"attribution"``, …) share everything a user does with them: index by name, rank heads,
take the top k, a long DataFrame, JSON save/load (atomic; NaN as null), a notebook table.

**One NaN rule**: a NaN means the head has no value (not scored, not patched); it is left
out of :meth:`HeadResult.ranking` and of the DataFrame, never ranked first or last.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from focuslens.errors import DataError, ModelError
from focuslens.io import write_json
from focuslens.models import model_id

__all__ = ["HeadResult"]

Head = tuple[int, int]


class HeadResult:
    """Base of the per-head results. A subclass is a dataclass that names its main field
    (``VALUES``: name -> ``[L, H]``), the other tensor-dict fields it saves (``TENSORS``),
    what its names are called (``KIND``), its default name and its file format."""

    VALUES: ClassVar[str]
    TENSORS: ClassVar[tuple[str, ...]]
    KIND: ClassVar[str]
    DEFAULT: ClassVar[str | None] = None
    FORMAT: ClassVar[str]
    metadata: dict

    # ---------------------------------------------------------------- access
    @property
    def values(self) -> dict[str, Tensor]:
        return getattr(self, self.VALUES)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(next(iter(self.values.values())).shape)

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.values:
            raise KeyError(f"no {self.KIND} {name!r}; available: {self.names}")
        return self.values[name]

    def _name(self, name: str | None) -> str:
        if name is not None:
            return name
        return self.DEFAULT if self.DEFAULT in self.values else self.names[0]

    def ranking(self, name: str | None = None, *, absolute: bool = False) -> list[Head]:
        """Heads with a value as (layer, head), largest first (``absolute``: largest
        magnitude); NaN heads are left out."""
        flat = self[self._name(name)].float().flatten()
        flat = flat.abs() if absolute else flat
        order = torch.argsort(torch.nan_to_num(flat, nan=-torch.inf), descending=True, stable=True).tolist()
        n_heads = self.shape[1]
        return [(i // n_heads, i % n_heads) for i in order if not torch.isnan(flat[i])]

    def top_k(self, k: int, name: str | None = None, *, absolute: bool = False) -> list[Head]:
        """The k best heads (fewer if fewer have a value)."""
        return self.ranking(name, absolute=absolute)[:k]

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per (layer, head, name) with a value, plus any per-head
        companion tensors of the same name (e.g. ``ci_low``/``ci_high``) as columns."""
        extra = [f for f in self.TENSORS if f != self.VALUES and self._per_head(f)]
        rows = []
        for name, values in self.values.items():
            for layer, head in torch.nonzero(~values.isnan()).tolist():
                row = {"layer": layer, "head": head, self.KIND: name, "value": float(values[layer, head])}
                for f in extra:
                    t = getattr(self, f).get(name)
                    row[f] = float(t[layer, head]) if t is not None else float("nan")
                rows.append(row)
        return pd.DataFrame(rows, columns=["layer", "head", self.KIND, "value", *extra])

    def _per_head(self, field_name: str) -> bool:
        return all(t.shape == self.shape for t in getattr(self, field_name).values())

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write JSON (tensors as nested lists, NaN as null) atomically; returns the path."""

        blob = {"format": self.FORMAT, "metadata": self.metadata}
        blob |= {f: {k: v.float().numpy().tolist() for k, v in getattr(self, f).items()} for f in self.TENSORS}
        return write_json(Path(path), blob)

    @classmethod
    def load(cls, path: str | Path, *, model=None):
        """Read :meth:`save` output; with ``model``, check it was computed for that model."""
        path = Path(path)
        try:
            blob = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read a {cls.__name__} file ({e}).") from e
        if not isinstance(blob, dict) or blob.get("format") != cls.FORMAT:
            found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise DataError(f"{path} is not a focuslens {cls.__name__} file (format={found!r}).")
        missing = [f for f in (*cls.TENSORS, "metadata") if f not in blob]
        if missing:
            raise DataError(f"{path}: field {missing[0]!r} is missing.")
        tensors = {f: {k: torch.tensor(np.array(v, dtype=np.float64), dtype=torch.float32) for k, v in blob[f].items()}
                   for f in cls.TENSORS}
        result = cls(**tensors, metadata=blob["metadata"])
        if not result.values:
            raise DataError(f"{path}: field {cls.VALUES!r} holds no {cls.KIND}.")
        shapes = {k: tuple(v.shape) for f in cls.TENSORS for k, v in tensors[f].items() if f == cls.VALUES}
        if len(set(shapes.values())) > 1:
            raise DataError(f"{path}: the {cls.KIND}s of {cls.VALUES!r} have different shapes {shapes}.")
        if model is not None:
            result.check_model(model)
        return result

    def check_model(self, model) -> None:
        """Raise ``ModelError`` unless this result fits ``model`` (shape and identity)."""

        want = (model.cfg.n_layers, model.cfg.n_heads)
        if self.shape != want:
            raise ModelError(f"{type(self).__name__} of shape {self.shape} (layers, heads) does not fit the model "
                             f"{model_id(model)!r} with {want}.")
        saved = self.metadata.get("model")
        if saved and saved != model_id(model):
            raise ModelError(f"{type(self).__name__} was computed for model {saved!r}, not for the loaded "
                             f"{model_id(model)!r}.")

    # ---------------------------------------------------------------- display
    def _repr_html_(self) -> str:
        top = {m: self.top_k(10, m) for m in self.names}
        header = "".join(f"<th>{html.escape(m)}</th>" for m in self.names)

        def cell(m, i):
            if i >= len(top[m]):
                return "<td></td>"
            layer, head = top[m][i]
            return f"<td>L{layer}H{head} ({float(self[m][layer, head]):.3f})</td>"

        body = "".join(f"<tr><td>{i + 1}</td>{''.join(cell(m, i) for m in self.names)}</tr>"
                       for i in range(max((len(t) for t in top.values()), default=0)))
        meta = ", ".join(f"{k}={html.escape(str(v))}" for k, v in self.metadata.items()
                         if k in ("model", "setting", "answer_rows", "n_examples", "n_pairs", "seed"))
        return (f"<div><b>{type(self).__name__}</b> {self.shape[0]} layers × {self.shape[1]} heads; {meta}<br>"
                f"<table><tr><th>#</th>{header}</tr>{body}</table></div>")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.metadata.get('model')!r}, shape={self.shape}, "
                f"{self.KIND}s={self.names})")

