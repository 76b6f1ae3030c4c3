"""The statistics every table uses: confidence intervals and rank correlation, on
:mod:`scipy.stats`.

Every number this package reports about a model is measured on a finite set of prompts,
so it comes with an interval that says how far it could move on another draw of prompts
of the same kind. Which interval fits depends on what the number is:

* **An accuracy** (a fraction of prompts answered correctly): :func:`wilson_interval`.
  Each prompt is a coin flip, right or wrong, so the count of correct answers is binomial
  and the Wilson score interval is the interval of that binomial proportion. Unlike the
  textbook ``p ± 1.96·√(p(1−p)/n)`` it stays inside [0, 1], is not empty at p = 0 or 1
  and keeps close to its nominal coverage down to a few dozen prompts. It needs only
  ``(accuracy, n)``, so it is what the accuracy curves draw. Use it when each prompt
  counts once and is independent of the others.

* **Any other statistic of independent values** (a mean attention mass, a mean margin, a
  per-head score averaged over prompts): :func:`bootstrap_ci`. The percentile bootstrap
  resamples the values with replacement many times, recomputes the statistic on each
  resample and reports the middle 95 % of those recomputed values. It assumes nothing
  about the values' distribution, only that they are independent draws; it works for
  any statistic (``np.mean``, ``np.median``, ...) and for many columns at once (``axis``:
  one interval per head). With few values (say under 20) it is too narrow; it cannot
  invent variation the sample does not show.

* **A difference between two conditions on the same prompts** (steered − unsteered
  accuracy): :func:`paired_bootstrap_ci`. Pairing matters: the per-prompt differences
  vary far less than either condition alone (an easy prompt is easy both ways), so
  bootstrapping the differences gives a much tighter, and correct, interval than two
  separate intervals would. When the values come in groups that are not independent
  (all answer positions of one question; all layouts of one example), pass
  ``clusters``: whole groups are resampled together (the *cluster bootstrap*), so the
  interval reflects the number of independent groups, not the inflated number of rows.
  Treating correlated rows as independent makes an interval too narrow; with groups of
  identical rows, resampling rows instead of groups would shrink it by about √(group
  size).

* **Agreement of two rankings** (does the contextual score rank heads like the causal
  effect?): :func:`spearman`, the rank correlation (1: same order, −1: reversed, 0: no
  relation), over the pairs where both values are finite.

All intervals are two-sided at ``confidence`` (95 % by default). The bootstraps are
seeded (``seed``; a ``numpy.random.default_rng``): the same inputs give the same interval.

>>> [round(x, 3) for x in wilson_interval(0.5, 40)]
[0.352, 0.648]
>>> spearman([1, 2, 3, 4], [10, 20, 30, 35]), spearman([1, 2, 3], [3, 2, 1])
(1.0, -1.0)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from focuslens.errors import DataError

__all__ = ["wilson_interval", "spearman", "bootstrap_ci", "paired_bootstrap_ci"]

def _scipy_stats():
    """``scipy.stats``, imported on first use: it costs ~0.6 s, which every ``import
    focuslens`` (and every worker process) would otherwise pay."""
    import scipy.stats

    return scipy.stats


def _rng_keyword() -> str:
    """scipy 1.15 renamed ``bootstrap(random_state=...)`` to ``rng=...`` (SPEC 7); either takes a Generator."""
    return "rng" if "rng" in inspect.signature(_scipy_stats().bootstrap).parameters else "random_state"
#: Resampled values held at once (float64: 256 MiB); larger bootstraps run in batches.
_BATCH_ELEMENTS = 2**25


def _array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


# ------------------------------------------------------------------ accuracy
def wilson_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on ``n`` prompts; ``(nan, nan)``
    for ``n <= 0`` or a NaN accuracy. A whole number correct goes through scipy's
    ``binomtest(k, n).proportion_ci(method="wilson")``; a fractional one (a mean over several
    random draws, e.g. 22.5 of 40) through the same score formula at ``p = accuracy``, with
    the normal quantile from ``scipy.stats.norm``.

    >>> [round(x, 3) for x in wilson_interval(0.5, 40)]
    [0.352, 0.648]
    >>> wilson_interval(1.0, 10)[1], wilson_interval(0.5, 0)
    (1.0, (nan, nan))
    """
    if n <= 0 or not math.isfinite(accuracy):
        return float("nan"), float("nan")
    n = int(n)
    if not 0.0 <= accuracy <= 1.0:
        raise DataError(f"wilson_interval: accuracy {accuracy} is outside [0, 1].")
    k = accuracy * n
    if abs(k - round(k)) < 1e-9:
        ci = _scipy_stats().binomtest(round(k), n).proportion_ci(confidence_level=confidence, method="wilson")
        return float(ci.low), float(ci.high)
    z = float(_scipy_stats().norm.ppf(0.5 + confidence / 2))
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------ rank agreement
def spearman(x, y) -> float:
    """Spearman rank correlation over the pairs where both values are finite (ties get
    their average rank); NaN for fewer than two pairs or a constant input. ``x``, ``y``:
    tensors, arrays or lists of the same length (flattened).

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 35]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    x, y = _array(x).ravel(), _array(y).ravel()
    if len(x) != len(y):
        raise DataError(f"spearman: x has {len(x)} values, y has {len(y)}.")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(round(_scipy_stats().spearmanr(x, y).statistic, 12))


# ------------------------------------------------------------------ bootstrap
def bootstrap_ci(values, statistic: Callable = np.mean, *, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0, method: str = "percentile", axis: int = 0):
    """Bootstrap confidence interval ``(low, high)`` of ``statistic(values)``, resampling
    the values along ``axis`` (:func:`scipy.stats.bootstrap`; ``method``: ``"percentile"``,
    ``"basic"`` or ``"BCa"``). ``statistic`` is called as ``statistic(sample, axis=-1)``
    when it takes ``axis`` (vectorised), else once per resample. For 1-D ``values`` the
    bounds are floats; otherwise arrays of the other axes' shape (one interval per column).
    One value along ``axis`` gives ``(statistic, statistic)``: every resample is the same.

    >>> low, high = bootstrap_ci([0.2, 0.4, 0.5, 0.9, 0.3, 0.6])
    >>> bool(low < np.mean([0.2, 0.4, 0.5, 0.9, 0.3, 0.6]) < high)
    True
    """
    data = _array(values)
    if data.ndim == 0 or data.shape[axis] == 0:
        raise DataError("bootstrap_ci: no values.")
    if data.shape[axis] == 1:
        point = np.asarray(statistic(np.moveaxis(data, axis, -1), axis=-1) if _takes_axis(statistic)
                           else np.apply_along_axis(statistic, axis, data))
        return _bounds(point, point)
    batch = max(1, _BATCH_ELEMENTS // data.size)
    res = _scipy_stats().bootstrap((data,), statistic, n_resamples=n_resamples, batch=min(batch, n_resamples),
                                axis=axis, confidence_level=confidence, method=method,
                                **{_rng_keyword(): np.random.default_rng(seed)})
    return _bounds(res.confidence_interval.low, res.confidence_interval.high)


def paired_bootstrap_ci(diffs, clusters=None, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                        method: str = "percentile") -> tuple[float, float]:
    """Bootstrap confidence interval ``(low, high)`` of the mean of paired differences
    (condition A − condition B on the same prompts).

    ``clusters`` (one label per difference, e.g. the question id): resample whole
    clusters instead of single differences, and take the mean over all differences in
    the resampled clusters (Σ cluster sums / Σ cluster sizes). Clusters are numbered in
    order of first appearance, so with every label distinct this is the unclustered
    interval exactly.

    >>> paired_bootstrap_ci([0.0, 0.0, 0.0])
    (0.0, 0.0)
    """
    diffs = _array(diffs).ravel()
    if clusters is None:
        return bootstrap_ci(diffs, np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed, method=method)
    codes, _ = pd.factorize(np.asarray(clusters, dtype=object).ravel() if not isinstance(clusters, torch.Tensor)
                            else clusters.detach().cpu().numpy().ravel(), sort=False)
    if len(codes) != len(diffs):
        raise DataError(f"paired_bootstrap_ci: {len(diffs)} differences but {len(codes)} cluster labels.")
    if (codes < 0).any():
        raise DataError("paired_bootstrap_ci: a cluster label is missing (None/NaN).")
    if diffs.size == 0:
        raise DataError("paired_bootstrap_ci: no values.")
    sums, counts = np.bincount(codes, weights=diffs), np.bincount(codes)

    def weighted_mean(idx, axis=-1):
        idx = np.asarray(idx).astype(np.intp)
        return sums[idx].sum(axis) / counts[idx].sum(axis)

    return bootstrap_ci(np.arange(len(sums)), weighted_mean, n_resamples=n_resamples, confidence=confidence,
                        seed=seed, method=method)


def _takes_axis(statistic: Callable) -> bool:
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):
        return False


def _bounds(low, high):
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    return (float(low), float(high)) if low.ndim == 0 else (low, high)
