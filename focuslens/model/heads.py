"""Head selection: the one place where ``heads=`` is read.

Every function of focuslens that takes ``heads`` reads it with :func:`resolve_heads` and
also takes the ``ranking`` an int refers to. The forms, the same everywhere:

* an int ``k``: the top k of ``ranking``, best first. ``ranking`` is anything that ranks
  heads: a :class:`~focuslens.measure.scoring.HeadScores`, a
  :class:`~focuslens.causal.patching.PatchingResult`, a
  :class:`~focuslens.directions.FocusDirections` (its ``ranking()``), or a list of
  ``(layer, head)`` pairs. ``k`` must be in ``1..len(ranking)``: a selection is never
  silently truncated (one rule for every caller);
* ``(layer, head)`` pairs (order kept, duplicates dropped);
* ``"all"`` (or None): every head;
* a ``[n_layers, n_heads]`` boolean mask (or ``[variant, n_layers, n_heads]`` for the
  batched sweeps, one selection per batch row).

A head outside the model is :class:`~focuslens.errors.ModelError`, everywhere; a selection
that cannot be read (a string, an int without a ranking, k too large for the ranking) is
:class:`~focuslens.errors.DataError`.

>>> resolve_heads((2, 3), 2, ranking=[(1, 2), (0, 0), (1, 1)])
[(1, 2), (0, 0)]
>>> resolve_heads((2, 3), [(0, 1), (0, 1), (1, 0)])
[(0, 1), (1, 0)]
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from focuslens.errors import DataError, ModelError

__all__ = [
    "Head",
    "HookSpec",
    "model_shape",
    "all_heads",
    "ranking_of",
    "resolve_heads",
    "head_mask",
    "head_masks",
    "variant_masks",
    "random_heads_outside",
    "top_and_random",
]

Head = tuple[int, int]
HookSpec = tuple[str, object]  # (hook name, fn(activation, hook) -> activation | None)


def model_shape(model) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a bridge (its ``cfg``) or of an ``(n_layers, n_heads)`` shape."""
    if hasattr(model, "cfg"):
        return int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_layers, n_heads = model
    return int(n_layers), int(n_heads)


def all_heads(model) -> list[Head]:
    """Every head of the model as ``(layer, head)``, layer-major."""
    n_layers, n_heads = model_shape(model)
    return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def _pair(h, where: str) -> Head:
    """``h`` as a (layer, head) pair of ints, or a DataError naming ``where``."""
    try:
        if isinstance(h, str) or len(h) != 2 or any(isinstance(v, bool) for v in h):
            raise TypeError
        return operator.index(h[0]), operator.index(h[1])
    except TypeError:
        raise DataError(f"{where}: {h!r} is not a (layer, head) pair of ints.") from None


def ranking_of(source, *, field: str = "ranking") -> list[Head]:
    """The heads ``source`` ranks, best first: a per-head result or directions (their
    ``ranking()``) or a sequence of ``(layer, head)`` pairs."""
    if source is None:
        raise DataError(f"{field} is None: an int k is the top k of a ranking; pass ranking=<HeadScores, "
                        "PatchingResult, FocusDirections or a list of (layer, head)>.")
    if callable(getattr(source, "ranking", None)):
        return [tuple(h) for h in source.ranking()]
    if isinstance(source, (str, bytes, Tensor)) or not isinstance(source, Iterable):
        raise DataError(f"{field} is a {type(source).__name__}: pass a HeadScores, PatchingResult, "
                        "FocusDirections or a list of (layer, head) pairs.")
    return [_pair(h, f"{field}[{i}]") for i, h in enumerate(source)]


def _check_inside(heads: Iterable[Head], shape: tuple[int, int]) -> None:
    n_layers, n_heads = shape
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ModelError(f"head ({layer}, {head}) is outside the model's {n_layers} layers × {n_heads} heads.")


def resolve_heads(model, heads="all", ranking=None, *, layer: int | None = None) -> list[Head]:
    """The one reading of a head selection (module docstring), as ``(layer, head)`` pairs.

    ``model`` is a bridge or an ``(n_layers, n_heads)`` shape; ``layer=`` alone selects every
    head of that layer.
    """
    shape = model_shape(model)
    n_layers, n_heads = shape
    if layer is not None:
        if heads not in (None, "all"):
            raise DataError("pass heads= or layer=, not both.")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ModelError(f"layer={layer!r} is not a layer of this model (0..{n_layers - 1}).")
        return [(layer, h) for h in range(n_heads)]
    if heads is None or (isinstance(heads, str) and heads == "all"):
        return all_heads(shape)
    if isinstance(heads, Tensor) and heads.dtype == torch.bool:
        if tuple(heads.shape) != shape:
            raise ModelError(f"head mask of shape {tuple(heads.shape)} does not match {n_layers} layers × {n_heads} heads.")
        return [(int(a), int(b)) for a, b in heads.nonzero().tolist()]
    if isinstance(heads, str):
        raise DataError(f"heads={heads!r}: use an int (top k of ranking=), (layer, head) pairs, 'all' or a mask.")
    if isinstance(heads, int) and not isinstance(heads, bool):
        if ranking is None:
            raise DataError(f"heads={heads}: an int is the top k of a ranking, and none was given; pass "
                            "ranking=<HeadScores, PatchingResult, FocusDirections or a list of (layer, head)>.")
        order = ranking_of(ranking)
        if not 0 < heads <= len(order):
            raise DataError(f"heads={heads}: the ranking has {len(order)} heads (k must be 1..{len(order)}).")
        heads = order[:heads]
    chosen = [_pair(h, "heads") for h in heads]
    _check_inside(chosen, shape)
    return list(dict.fromkeys(chosen))


def head_mask(model, heads="all", ranking=None) -> Bool[Tensor, "*variant layer head"]:
    """A ``[n_layers, n_heads]`` boolean mask of a selection (:func:`resolve_heads`); a
    ``[..., n_layers, n_heads]`` mask passes through after a shape check."""
    n_layers, n_heads = model_shape(model)
    if isinstance(heads, Tensor):
        if tuple(heads.shape[-2:]) != (n_layers, n_heads):
            raise ModelError(f"head mask of shape {tuple(heads.shape)} does not match {n_layers} layers × {n_heads} heads.")
        return heads.bool()
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in resolve_heads(model, heads, ranking):
        mask[layer, head] = True
    return mask


def head_masks(model, groups: Sequence[Iterable[Head]]) -> Bool[Tensor, "variant layer head"]:
    """One head mask per variant (an empty group steers nothing), for batched sweeps."""
    return torch.stack([head_mask(model, list(g)) for g in groups])


def variant_masks(model, heads, ranking=None) -> Bool[Tensor, "variant layer head"]:
    """``heads`` as a ``[variant, layer, head]`` mask: a ``[variant, L, H]`` mask passes
    through; one selection (any form of :func:`resolve_heads`) is a single variant."""
    mask = head_mask(model, heads, ranking)
    return mask if mask.ndim == 3 else mask[None]


def require_heads(mask: Tensor) -> None:
    """An intervention whose heads select nothing would silently change nothing."""
    if not mask.any():
        raise DataError("heads selects no head: the intervention would leave the model unchanged.")


def per_variant(value, n: int, name: str) -> Float[Tensor, "variant"]:
    """``value`` as one finite float per variant (one value broadcasts)."""
    v = torch.as_tensor(value, dtype=torch.float32).flatten()
    if not torch.isfinite(v).all():
        raise DataError(f"{name}={v.tolist() if v.numel() > 1 else v.item()} must be finite: a NaN or inf "
                        f"{name} turns every steered logit into NaN.")
    if v.numel() == 1:
        v = v.expand(n)
    if v.numel() != n:
        raise DataError(f"{name} has {v.numel()} values for {n} variants (head selections).")
    return v


def random_heads_outside(model, top: Iterable[Head], k: int, rng: random.Random) -> list[Head]:
    """``k`` heads drawn with ``rng`` among the heads not in ``top`` (fewer if fewer are left):
    the control group of a top-k selection."""
    taken = set(top)
    pool = [h for h in all_heads(model) if h not in taken]
    return rng.sample(pool, min(k, len(pool)))


def top_and_random(model, ranking, ks: Sequence[int], n_random: int, seed: int) -> list[tuple[str, int, int, list[Head]]]:
    """``(group, k, draw, heads)`` for every k: the top k of ``ranking`` (group ``"top"``)
    and ``n_random`` seeded draws of k heads outside it (group ``"random"``). One generator
    per call, drawn in ``ks`` order, so a (seed, ks) pair always gives the same controls."""
    order = ranking_of(ranking)
    rng = random.Random(seed)
    out = []
    for k in ks:
        top = resolve_heads(model, int(k), order)
        out.append(("top", int(k), 0, top))
        out += [("random", int(k), d, random_heads_outside(model, top, int(k), rng)) for d in range(n_random)]
    return out
