"""Cross-model tables: where contextual heads sit, and how focus directions compare.

Models differ in depth (e.g. 28 or 30 layers) and width (9 to 28 heads), so layers are
compared by **relative depth** ``layer / (n_layers − 1)``: 0 is the first layer, 1 the
last. Every figure takes its inputs from the caller (``HeadScores``, ``FocusDirections``
or plain rankings, keyed by a display name) and works for any layer, head and head-size
counts.

This module holds the numbers, as small functions that return DataFrames so they can be
checked and reused: :func:`top_heads_table`, :func:`norm_profile`, :func:`cosine_matrix`,
:func:`norm_rank_table` and :func:`topk_overlap`. The figures drawn from them are in
:mod:`focuslens.viz.cross_model`.

>>> relative_depth(0, 30), relative_depth(29, 30), relative_depth(27, 28)
(0.0, 1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from focuslens.directions.artifact import FocusDirections
from focuslens.errors import DataError, ModelError
from focuslens.measure.results import HeadResult, head_values, rank_heads
from focuslens.measure.scoring import HeadScores
from focuslens.model.heads import resolve_heads

__all__ = [
    "relative_depth",
    "top_heads_table",
    "norm_profile",
    "cosine_matrix",
    "norm_rank_table",
    "topk_overlap",
    "topk_depth_overlap",
]

Head = tuple[int, int]

#: One colour per model, in the order the caller's dict lists them (colour-blind safe).
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


# ------------------------------------------------------------------ inputs
def relative_depth(layer, n_layers: int):
    """``layer / (n_layers − 1)``: 0 for the first layer, 1 for the last (0 for a
    one-layer model). Works on ints, arrays and tensors."""
    if n_layers < 1:
        raise DataError(f"n_layers={n_layers}: a model needs at least one layer.")
    return layer / (n_layers - 1) if n_layers > 1 else layer * 0.0


@dataclass
class _HeadMap:
    """One model's heads, whatever the input type: a value per head and a ranking."""

    name: str
    values: Tensor  # [n_layers, n_heads], NaN where unknown
    ranking: list[Head]  # best first, only heads with a value
    label: str  # what ``values`` is, for colour bars

    @property
    def n_layers(self) -> int:
        return self.values.shape[0]

    @property
    def n_heads(self) -> int:
        return self.values.shape[1]


def _label(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


def _require_mapping(items, field: str, what: str) -> Mapping:
    if not isinstance(items, Mapping) or not items:
        raise DataError(
            f"{field} is empty or not a dict: pass {{name: {what}, ...}} with at least one entry."
        )
    return items


def _check_ranking(
    ranking, field: str, n_layers: int | None = None, n_heads: int | None = None
) -> list[Head]:
    """Heads as (layer, head) ints: pairs, no duplicates, inside the shape when given."""
    heads: list[Head] = []
    for i, h in enumerate(ranking):
        if not (isinstance(h, Sequence) and len(h) == 2 and all(isinstance(v, (int, np.integer)) for v in h)):
            raise DataError(f"{field}[{i}] = {h!r} is not a (layer, head) pair of ints.")
        layer, head = int(h[0]), int(h[1])
        if (
            layer < 0
            or head < 0
            or (n_layers is not None and layer >= n_layers)
            or (n_heads is not None and head >= n_heads)
        ):
            shape = f"{n_layers} layers × {n_heads} heads" if n_layers is not None else "non-negative indices"
            raise ModelError(
                f"{field}[{i}] = ({layer}, {head}) is outside {shape}: fix the ranking or its shape."
            )
        heads.append((layer, head))
    if len(set(heads)) != len(heads):
        dup = next(h for h in heads if heads.count(h) > 1)
        raise DataError(f"{field} lists head {dup} more than once.")
    return heads


#: The label of a ranking read as per-head values (:func:`_rank_values`): one encoding for a
#: FocusDirections, a bare ranking and ``HeadScores.from_ranking``.
RANK_LABEL = "rank score<br>(1 = best, 0 = last ranked)"


def _rank_values(ranking: list[Head], n_layers: int, n_heads: int) -> Tensor:
    """Rank score in [0, 1]: 1 for the best head, 0 for the last ranked, NaN unranked."""

    values = HeadScores.from_ranking(ranking, n_layers=n_layers, n_heads=n_heads)["rank_score"]
    return values / (len(ranking) - 1) if len(ranking) > 1 else values + 1  # one ranked head: 1


def _per_head(name: str, source, field: str, metric: str | None) -> _HeadMap:
    """A per-head result — HeadScores, PatchingResult, ``(result, name)`` or a tensor — via
    :func:`~focuslens.measure.results.head_values`, ranked by :func:`~focuslens.measure.results.rank_heads`.
    ``metric`` picks the name of a bare result (default: its own default name)."""
    if isinstance(source, HeadResult):
        if not source.values:
            raise DataError(f"{field} has no {source.KIND}s.")
        metric = source.default_name if metric is None else metric
        if metric not in source.names:
            raise DataError(f"{field}: metric={metric!r} is not one of its {source.KIND}s {source.names}; "
                            f"pass (result, name) to choose per entry.")
        source = (source, metric)
    values = head_values(source, field=field).detach().float().cpu()
    used = source[1] if isinstance(source, tuple) else "value"
    ranking = rank_heads(values)
    if used == "rank_score":  # HeadScores.from_ranking: n - 1 (best) ... 0, re-encoded as every ranking is
        return _HeadMap(name, _rank_values(ranking, *values.shape), ranking, RANK_LABEL)
    return _HeadMap(name, values, ranking, used.replace("_", " "))


def _head_map(name: str, source, field: str, metric: str | None = None) -> _HeadMap:
    """Read a per-head result (:func:`_per_head`), a FocusDirections or ``(ranking,
    n_layers, n_heads)``."""

    if isinstance(source, (HeadResult, Tensor)) or (
        isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], HeadResult)
    ):
        return _per_head(name, source, field, metric)
    if isinstance(source, FocusDirections):
        if not source.ranking():
            raise DataError(
                f"{field}: these directions carry no head ranking (FocusDirections.ranking is empty)."
            )
        n_layers, n_heads, _ = source.shape
        ranking = _check_ranking(source.ranking(), f"{field}.ranking", n_layers, n_heads)
        return _HeadMap(name, _rank_values(ranking, n_layers, n_heads), ranking, RANK_LABEL)
    if isinstance(source, tuple) and len(source) == 3:
        ranking, n_layers, n_heads = source
        if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (n_layers, n_heads)):
            raise DataError(f"{field}: n_layers={n_layers!r} and n_heads={n_heads!r} must be positive ints.")
        ranking = _check_ranking(ranking, f"{field} ranking", int(n_layers), int(n_heads))
        if not ranking:
            raise DataError(f"{field}: the ranking is empty.")
        return _HeadMap(
            name, _rank_values(ranking, int(n_layers), int(n_heads)), ranking, RANK_LABEL
        )
    raise DataError(
        f"{field} is a {type(source).__name__}: pass a HeadScores or PatchingResult (or (result, name)), "
        "a [layer, head] tensor, a FocusDirections with a ranking, or a tuple (ranking, n_layers, n_heads)."
    )


def _ranking_only(source, field: str, metric: str | None) -> tuple[list[Head], tuple[int, int] | None]:
    """A ranking and its (layers, heads) shape when known; plain lists are accepted too."""
    if isinstance(source, list):
        return _check_ranking(source, field), None
    m = _head_map("", source, field, metric)
    return m.ranking, (m.n_layers, m.n_heads)


def _as_directions(directions, field: str = "directions") -> dict:
    """A FocusDirections (named by its model) or a dict of them."""

    if isinstance(directions, FocusDirections):
        directions = {directions.model or "directions": directions}
    _require_mapping(directions, field, "FocusDirections")
    for name, d in directions.items():
        if not isinstance(d, FocusDirections):
            raise DataError(f"{field}[{name!r}] is a {type(d).__name__}, not a FocusDirections.")
    return dict(directions)


# ------------------------------------------------------------------ computations
def top_heads_table(models: Mapping, *, top_k: int = 20, metric: str | None = None) -> pd.DataFrame:
    """Each model's top-k heads, one row per head: ``model``, ``rank`` (1 = best),
    ``layer``, ``head``, ``n_layers``, ``n_heads``, ``relative_depth``, ``score``.
    Models with fewer ranked heads than ``top_k`` contribute all of theirs."""
    maps = _head_maps(models, metric)
    _check_k(top_k, "top_k")
    return _top_table(maps, top_k)


def _head_maps(models: Mapping, metric: str | None) -> list[_HeadMap]:
    _require_mapping(models, "models", "HeadScores | FocusDirections | (ranking, n_layers, n_heads)")
    return [_head_map(str(name), src, f"models[{name!r}]", metric) for name, src in models.items()]


def _check_k(k, field: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"{field}={k!r}: use a positive number of heads.")


def _top_table(maps: list[_HeadMap], top_k: int) -> pd.DataFrame:
    rows = [
        {
            "model": m.name,
            "rank": rank + 1,
            "layer": layer,
            "head": head,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "relative_depth": relative_depth(layer, m.n_layers),
            "score": float(m.values[layer, head]),
        }
        for m in maps
        for rank, (layer, head) in enumerate(m.ranking[:top_k])
    ]
    return pd.DataFrame(
        rows, columns=["model", "rank", "layer", "head", "n_layers", "n_heads", "relative_depth", "score"]
    )


def norm_profile(directions) -> pd.DataFrame:
    """Per-layer statistics of the direction norms over heads, long format: one row per
    (``model``, ``vector`` ∈ {"query", "key"}, ``layer``) with ``n_layers``,
    ``relative_depth``, ``median``, ``q25``, ``q75``, ``min`` and ``max`` of ‖d‖₂.

    The median of an even number of heads is the mean of the two middle values."""
    rows = []
    for name, d in _as_directions(directions).items():
        n_layers = d.shape[0]
        for vector, t in (("query", d.q), ("key", d.k)):
            norms = t.float().norm(dim=-1)  # [layer, head]
            stats = {
                "median": norms.quantile(0.5, dim=-1),
                "q25": norms.quantile(0.25, dim=-1),
                "q75": norms.quantile(0.75, dim=-1),
                "min": norms.amin(dim=-1),
                "max": norms.amax(dim=-1),
            }
            for layer in range(n_layers):
                rows.append(
                    {
                        "model": name,
                        "vector": vector,
                        "layer": layer,
                        "n_layers": n_layers,
                        "relative_depth": relative_depth(layer, n_layers),
                        **{k: float(v[layer]) for k, v in stats.items()},
                    }
                )
    return pd.DataFrame(rows)


def _default_heads(d, n: int = 20) -> list[Head]:
    """The top-n of the ranking, else every head."""
    if d.ranking():
        return list(d.ranking()[:n])
    return [(layer, head) for layer in range(d.shape[0]) for head in range(d.shape[1])]


def cosine_matrix(directions, heads=None, *, vector: str = "q") -> pd.DataFrame:
    """Cosine similarity between the ``vector`` ("q" or "k") directions of ``heads``
    within one :class:`~focuslens.directions.artifact.FocusDirections`, as a square DataFrame
    indexed by ``L{layer}H{head}`` labels. ``heads``: a list of (layer, head), an int
    (top-k of the ranking) or None (top-20 of the ranking, else every head). A zero
    vector has no direction: its row and column are NaN."""

    if not isinstance(directions, FocusDirections):
        raise DataError(f"directions is a {type(directions).__name__}: pass one FocusDirections.")
    if vector not in ("q", "k"):
        raise DataError(f"vector={vector!r}: use 'q' (query) or 'k' (key).")
    heads = _select_heads(directions, heads)
    t = getattr(directions, vector).float()
    vecs = torch.stack([t[layer, head] for layer, head in heads])
    norms = vecs.norm(dim=-1, keepdim=True)
    unit = vecs / norms.where(norms > 0, torch.tensor(float("nan")))
    labels = [_label(h) for h in heads]
    return pd.DataFrame((unit @ unit.T).clamp(-1, 1).numpy(), index=labels, columns=labels)


def _select_heads(d, heads) -> list[Head]:
    """None: the top 20 of the ranking, else every head; otherwise
    :func:`~focuslens.steer.split_softmax.resolve_heads` (k: the top k of the ranking)."""

    if heads is None:
        return _default_heads(d)
    chosen = resolve_heads(d.shape[:2], heads, d.ranking() or None)
    if not chosen:
        raise DataError("heads is empty: pass at least one (layer, head).")
    return chosen


def norm_rank_table(directions) -> pd.DataFrame:
    """Every ranked head of every model: ``model``, ``layer``, ``head``, ``rank``
    (1 = best), ``relative_rank`` (rank / number of heads in the model), ``q_norm``,
    ``k_norm``. Directions without a ranking raise ``DataError``."""
    frames = []
    for name, d in _as_directions(directions).items():
        if not d.ranking():
            raise DataError(f"directions[{name!r}] carry no head ranking: norm vs rank needs one.")
        df = d.norms().dropna(subset=["rank"]).copy()
        df["rank"] = df["rank"].astype(int) + 1
        df["relative_rank"] = df["rank"] / (d.shape[0] * d.shape[1])
        df.insert(0, "model", name)
        frames.append(
            df.sort_values("rank")[["model", "layer", "head", "rank", "relative_rank", "q_norm", "k_norm"]]
        )
    return pd.concat(frames, ignore_index=True)


def topk_overlap(results: Mapping, k: int = 20, *, metric: str | None = None) -> pd.DataFrame:
    """Top-k overlap ``|A ∩ B| / k`` between the head sets of several rankings of one
    model's heads (scoring settings, causal effects), as a symmetric DataFrame (1 on the
    diagonal). ``results``: name → HeadScores or PatchingResult (its ``metric``, default
    "gold" / its first method), ``(result, name)`` to choose per entry, a ``[layer, head]``
    tensor, a FocusDirections with a ranking, a ranking list or ``(ranking, n_layers,
    n_heads)``. Values are ranked by one rule (:func:`~focuslens.measure.results.rank_heads`,
    NaN heads left out); every ranking needs at least k heads."""
    _require_mapping(results, "results", "HeadScores | PatchingResult | ranking list")
    _check_k(k, "k")
    sets, shapes = {}, {}
    for name, src in results.items():
        ranking, shape = _ranking_only(src, f"results[{name!r}]", metric)
        if len(ranking) < k:
            raise DataError(f"results[{name!r}] ranks {len(ranking)} heads, fewer than k={k}: lower k.")
        sets[str(name)] = set(ranking[:k])
        if shape is not None:
            shapes[str(name)] = shape
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"results come from models of different shapes {shapes}: compare settings of one model."
        )
    names = list(sets)
    table = [[len(sets[a] & sets[b]) / k for b in names] for a in names]
    return pd.DataFrame(table, index=pd.Index(names, name="setting"), columns=names)


def topk_depth_overlap(models: Mapping, k: int = 20, *, bins: int = 10, metric: str | None = None) -> pd.DataFrame:
    """Whether models put their top-k heads at the same depths, for models of any shapes
    (where :func:`topk_overlap` needs one model): per model, the share ``p(b)`` of its top-k
    heads (:func:`top_heads_table`) in each of ``bins`` equal bins of relative depth over
    [0, 1]; per pair, ``Σ_b min(p_A(b), p_B(b))`` (1: the same depth profile, 0: no depth
    in common). A symmetric DataFrame, 1 on the diagonal."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise DataError(f"bins={bins!r} must be a positive integer.")
    table = top_heads_table(models, top_k=k, metric=metric)
    edges = np.linspace(0.0, 1.0, bins + 1)
    shares = {str(m): np.histogram(g.relative_depth, bins=edges)[0] / len(g) for m, g in table.groupby("model", sort=False)}
    names = list(shares)
    rows = [[float(np.minimum(shares[a], shares[b]).sum()) for b in names] for a in names]
    return pd.DataFrame(rows, index=pd.Index(names, name="model"), columns=names)
