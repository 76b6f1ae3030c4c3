"""One base class for per-head results: a ``[n_layers, n_heads]`` tensor per name.

:class:`~focuslens.measure.scoring.HeadScores` (names are metrics: ``"gold"``, ``"sink"``, …) and
:class:`~focuslens.causal.patching.PatchingResult` (names are methods: ``"exact"``,
``"attribution"``, …) share everything a user does with them: index by name, rank heads,
take the top k, a long DataFrame, JSON save/load (atomic; NaN as null), a notebook table.

**One NaN rule**: a NaN means the head has no value (not scored, not patched); it is left
out of :meth:`HeadResult.ranking` and of the DataFrame, never ranked first or last.

**One ranking rule**: :func:`rank_heads` (largest first, ties in (layer, head) order, NaN
left out). **One way in**: :func:`head_values` turns anything per-head — a ``[layer, head]``
tensor, a result (its default name), or ``(result, name)`` — into a tensor, so functions
that compare heads (``rank_agreement``, ``topk_overlap``) take any of them.

**Chance level**: :meth:`HeadResult.chance_level` is the value a head gets with no
mechanism at all (for attention masses: uniform attention over the keys it can see). NaN
means none is known; a :class:`~focuslens.measure.scoring.HeadScores` knows one per span metric.
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
from focuslens.io import json_safe, read_json, write_atomic
from focuslens.model.heads import Head, resolve_heads
from focuslens.model.load import model_id

__all__ = ["HeadResult", "head_values", "rank_heads", "is_head_ranking"]



def is_head_ranking(blob) -> bool:
    """Whether parsed JSON is a head ranking: a non-empty list of ``[layer, head]`` int
    pairs, best first (the paper's ``relevant_heads.json``)."""
    return isinstance(blob, list) and bool(blob) and all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in h)
        for h in blob)


def rank_heads(values: Tensor, *, absolute: bool = False) -> list[Head]:
    """Heads of a ``[n_layers, n_heads]`` tensor as (layer, head), largest first
    (``absolute``: largest magnitude); ties keep (layer, head) order; NaN heads are left out.

    >>> rank_heads(torch.tensor([[0.2, float("nan")], [0.9, 0.2]]))
    [(1, 0), (0, 0), (1, 1)]
    """
    flat = values.detach().float().flatten().cpu()
    flat = flat.abs() if absolute else flat
    order = torch.argsort(torch.nan_to_num(flat, nan=-torch.inf), descending=True, stable=True).tolist()
    n_heads = values.shape[1]
    return [(i // n_heads, i % n_heads) for i in order if not torch.isnan(flat[i])]


def head_values(source, *, field: str = "scores") -> Tensor:
    """Anything per-head as its ``[n_layers, n_heads]`` tensor: a tensor is returned as is,
    a :class:`HeadResult` gives its default name (``"gold"`` for HeadScores, the first
    method for a PatchingResult), ``(result, name)`` gives that name.

    ``field`` names the argument in errors (``DataError``), e.g. ``"scores_a"``.

    >>> head_values((scores, "sink")) is scores["sink"]          # doctest: +SKIP
    """
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], HeadResult):
        result, name = source
        if name not in result.names:
            raise DataError(f"{field}: {type(result).__name__} has no {result.KIND} {name!r}; "
                            f"available: {result.names}.")
        return result[name]
    if isinstance(source, HeadResult):
        return source.tensor()
    if isinstance(source, Tensor):
        if source.ndim != 2:
            raise DataError(f"{field} is a tensor of shape {tuple(source.shape)}: a per-head map is "
                            "[n_layers, n_heads].")
        return source
    raise DataError(f"{field} is a {type(source).__name__}: pass a [layer, head] tensor, a HeadScores or "
                    "PatchingResult, or (result, name) such as (scores, 'gold').")


class HeadResult:
    """Base of the per-head results. A subclass is a dataclass that names its main field
    (``VALUES``: name -> ``[L, H]``), the other tensor-dict fields it saves (``TENSORS``),
    what its names are called (``KIND``), its default name and its file format."""

    VALUES: ClassVar[str]
    TENSORS: ClassVar[tuple[str, ...]]
    KIND: ClassVar[str]
    DEFAULT: ClassVar[str | None] = None
    FORMAT: ClassVar[str]
    #: plain-JSON fields saved as they are; optional on load (older files lack them)
    EXTRAS: ClassVar[tuple[str, ...]] = ()
    #: tensor fields with a leading example axis (``[n, n_layers, n_heads]``); the other
    #: fields of ``TENSORS`` are ``[n_layers, n_heads]`` like ``VALUES``
    STACKED: ClassVar[tuple[str, ...]] = ("per_example",)
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

    @property
    def default_name(self) -> str:
        """The name used when none is given: ``DEFAULT`` if present, else the first."""
        return self.DEFAULT if self.DEFAULT in self.values else self.names[0]

    def _name(self, name: str | None) -> str:
        return self.default_name if name is None else name

    def tensor(self, name: str | None = None) -> Tensor:
        """The ``[n_layers, n_heads]`` tensor of ``name`` (default: :attr:`default_name`)."""
        return self[self._name(name)]

    def chance_level(self, name: str | None = None) -> float:
        """The value of ``name`` a head gets by chance (NaN: no chance level is known;
        subclasses that know one override this)."""
        return float("nan")

    def ranking(self, name: str | None = None, *, absolute: bool = False) -> list[Head]:
        """Heads with a value as (layer, head), largest first (``absolute``: largest
        magnitude); NaN heads are left out (:func:`rank_heads`)."""
        return rank_heads(self.tensor(name), absolute=absolute)

    def top_k(self, k: int, name: str | None = None, *, absolute: bool = False) -> list[Head]:
        """The k best heads; k must be in 1..(heads with a value), the one truncation rule of
        :func:`~focuslens.model.heads.resolve_heads`."""
        return resolve_heads(self.shape, k, self.ranking(name, absolute=absolute))

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
    def to_json(self) -> bytes:
        """The :meth:`save` file's bytes: JSON, tensors as nested lists, NaN as null."""
        blob = {"format": self.FORMAT, "metadata": self.metadata}
        blob |= {f: {k: v.float().numpy().tolist() for k, v in getattr(self, f).items()} for f in self.TENSORS}
        blob |= {f: getattr(self, f) for f in self.EXTRAS}
        return (json.dumps(json_safe(blob)) + "\n").encode()

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (the old file or the new one, never
        half); returns the path."""
        return write_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path, *, model=None):
        """Read :meth:`save` output; with ``model``, check it was computed for that model."""
        path = Path(path)
        result = cls._from_blob(read_json(path, cls.__name__), path, model)
        if model is not None:
            result.check_model(model)
        return result

    @classmethod
    def _from_blob(cls, blob, path: Path, model=None):
        """The result a parsed :meth:`save` file holds (``model`` lets a subclass read
        other formats whose shape only the model knows)."""
        if not isinstance(blob, dict) or blob.get("format") != cls.FORMAT:
            found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            hint = ("; it looks like a head ranking (a JSON list of [layer, head], best first): read it with "
                    "HeadScores.load or HeadScores.from_ranking_json") if is_head_ranking(blob) else ""
            raise DataError(f"{path} is not a focuslens {cls.__name__} file (format={found!r}){hint}.")
        missing = [f for f in (*cls.TENSORS, "metadata") if f not in blob]
        if missing:
            raise DataError(f"{path}: field {missing[0]!r} is missing.")
        tensors = {f: cls._tensor_field(blob[f], path, f) for f in cls.TENSORS}
        result = cls(**tensors, **{f: blob[f] for f in cls.EXTRAS if blob.get(f) is not None},
                     metadata=blob["metadata"])
        if not result.values:
            raise DataError(f"{path}: field {cls.VALUES!r} holds no {cls.KIND}.")
        shapes = {k: tuple(v.shape) for k, v in tensors[cls.VALUES].items()}
        if len(set(shapes.values())) > 1 or any(len(s) != 2 for s in shapes.values()):
            raise DataError(f"{path}: the {cls.KIND}s of {cls.VALUES!r} have different shapes {shapes} "
                            "(each must be [n_layers, n_heads]).")
        cls._check_companions(tensors, result.shape, path)
        return result

    @classmethod
    def _tensor_field(cls, raw, path: Path, field_name: str) -> dict[str, Tensor]:
        """A saved ``name -> nested lists`` field as tensors (null is NaN); ragged or
        non-numeric lists are a ``DataError`` naming the file, field and name."""
        if not isinstance(raw, dict):
            raise DataError(f"{path}: field {field_name!r} must be an object of {cls.KIND} -> nested lists, "
                            f"not a {type(raw).__name__}.")
        out = {}
        for name, value in raw.items():
            try:
                out[name] = torch.tensor(np.array(value, dtype=np.float64), dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}: field {field_name!r}, {cls.KIND} {name!r} is not a rectangular array "
                                f"of numbers ({str(e).split('. ')[0]}).") from None
        return out

    @classmethod
    def _check_companions(cls, tensors: dict[str, dict[str, Tensor]], shape: tuple[int, int], path: Path) -> None:
        """Every tensor of the other fields must be per head like the values: ``shape``, or
        ``[n, *shape]`` for the ``STACKED`` fields."""
        for f in cls.TENSORS:
            for name, t in tensors[f].items():
                ndim = 3 if f in cls.STACKED else 2
                empty = f in cls.STACKED and t.numel() == 0  # no examples: JSON keeps no shape
                if not empty and (t.ndim != ndim or tuple(t.shape[-2:]) != shape):
                    raise DataError(f"{path}: field {f!r}, {cls.KIND} {name!r} has shape {tuple(t.shape)}; the "
                                    f"{cls.KIND}s of {cls.VALUES!r} have {shape} (n_layers, n_heads).")

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
        """The top 10 of every name; a known chance level is shown under the name, and a
        head at or below it is greyed and marked "≤ chance"."""
        top = {m: self.ranking(m)[:10] for m in self.names}  # a display: at most 10
        chance = {m: self.chance_level(m) for m in self.names}
        header = "".join(f"<th>{html.escape(m)}" + (f"<br><small>chance {chance[m]:.3f}</small>"
                                                     if np.isfinite(chance[m]) else "") + "</th>"
                         for m in self.names)

        def cell(m, i):
            if i >= len(top[m]):
                return "<td></td>"
            layer, head = top[m][i]
            value = float(self[m][layer, head])
            if value <= chance[m]:  # False when the chance level is NaN (unknown)
                return f'<td style="color:#999">L{layer}H{head} ({value:.3f}, ≤ chance)</td>'
            return f"<td>L{layer}H{head} ({value:.3f})</td>"

        body = "".join(f"<tr><td>{i + 1}</td>{''.join(cell(m, i) for m in self.names)}</tr>"
                       for i in range(max((len(t) for t in top.values()), default=0)))
        meta = ", ".join(f"{k}={html.escape(str(v))}" for k, v in self.metadata.items()
                         if k in ("model", "setting", "answer_rows", "n_examples", "n_pairs", "seed"))
        return (f"<div><b>{type(self).__name__}</b> {self.shape[0]} layers × {self.shape[1]} heads; {meta}<br>"
                f"<table><tr><th>#</th>{header}</tr>{body}</table></div>")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.metadata.get('model')!r}, shape={self.shape}, "
                f"{self.KIND}s={self.names})")

