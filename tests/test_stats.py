"""focuslens.measure.stats: Wilson intervals, Spearman, bootstrap CIs (plain and clustered)."""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch

from focuslens.errors import DataError
from focuslens.measure import stats
from focuslens.measure.stats import bootstrap_ci, paired_bootstrap_ci, spearman, wilson_interval


def _wilson_reference(k: int, n: int, z: float) -> tuple[float, float]:
    """The slow reference: the Wilson score interval written out (as the hand-written
    ``evaluate.wilson_interval`` had it)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------ Wilson
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_wilson_matches_the_written_out_formula_on_a_grid(confidence):
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    for n in [1, 2, 3, 5, 7, 10, 20, 40, 97, 100, 500, 1000]:
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
            got = wilson_interval(k / n, n, confidence=confidence)
            want = _wilson_reference(k, n, z)
            assert got == pytest.approx(want, abs=1e-9), (k, n)


def test_wilson_differs_from_the_rounded_z_only_in_the_sixth_decimal():
    # the hand-written version used z = 1.96; scipy uses the exact quantile 1.95996...
    worst = max(abs(a - b) for n in range(1, 60) for k in range(n + 1)
                for a, b in zip(wilson_interval(k / n, n), _wilson_reference(k, n, 1.96)))
    assert 0 < worst < 1e-5


def test_wilson_known_values_and_edges():
    assert wilson_interval(0.5, 40) == pytest.approx((0.352, 0.648), abs=5e-4)
    assert wilson_interval(0.0, 10)[0] == 0.0 and wilson_interval(1.0, 10)[1] == 1.0
    assert 0.0 < wilson_interval(0.0, 10)[1] < 0.35 and 0.65 < wilson_interval(1.0, 10)[0] < 1.0
    assert wilson_interval(0.5, 400)[1] - wilson_interval(0.5, 400)[0] < wilson_interval(0.5, 40)[1] - 0.352
    assert wilson_interval(0.7, np.int64(30)) == wilson_interval(0.7, 30)
    for bad in [(0.5, 0), (0.5, -3), (float("nan"), 10)]:
        assert all(math.isnan(x) for x in wilson_interval(*bad))
    with pytest.raises(DataError, match="outside"):
        wilson_interval(1.5, 10)


# ------------------------------------------------------------------ Spearman
def test_spearman_values_and_inputs():
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == 1.0  # monotone: exactly 1
    assert spearman(np.arange(50.0), np.exp(np.arange(50.0) / 10)) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 − 6·4 / (5·24)
    x, y = [1, 2, 2, 3, 5, 5, 5], [3, 1, 4, 1, 5, 9, 2]  # ties: average ranks, Pearson of the ranks
    assert spearman(x, y) == pytest.approx(pd.Series(x).rank().corr(pd.Series(y).rank()))
    t = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    assert spearman(t, np.array([1, 2, 3, 4])) == spearman([1, 3, 2, 4], [1, 2, 3, 4]) == pytest.approx(0.8)


def test_spearman_drops_non_finite_pairs_and_is_nan_when_undefined():
    nan, inf = float("nan"), float("inf")
    assert spearman([1, nan, 3, 2, inf], [1, 2, 3, 4, 5]) == pytest.approx(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning: a constant input is NaN, quietly
        assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
        assert math.isnan(spearman([1, nan], [2, 3]))
        assert math.isnan(spearman([], []))
    with pytest.raises(DataError, match="3 values"):
        spearman([1, 2, 3], [1, 2])


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 50), rng.normal(1.0, 1.0, 800)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert isinstance(lo_s, float) and isinstance(hi_l, float)
    ratio = (hi_s - lo_s) / (hi_l - lo_l)
    assert 2.5 < ratio < 6  # ≈ √(800 / 50) = 4
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * large.std() / math.sqrt(800), rel=0.15)


def test_bootstrap_ci_is_the_percentile_bootstrap_of_numpy_resamples():
    values = np.random.default_rng(3).exponential(size=37)
    rng = np.random.default_rng(7)  # what the hand-written bootstraps did, with the same seed
    boot = values[rng.integers(0, values.size, (500, values.size))].mean(1)
    assert bootstrap_ci(values, n_resamples=500, seed=7) == pytest.approx(
        (np.quantile(boot, 0.025), np.quantile(boot, 0.975)), abs=1e-12)
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=2)


def test_bootstrap_ci_per_column_and_other_statistics():
    values = torch.randn(40, 3, 2, generator=torch.Generator().manual_seed(0))
    low, high = bootstrap_ci(values, n_resamples=300, axis=0)
    assert low.shape == high.shape == (3, 2) and (low < values.mean(0).numpy()).all()
    for i, j in [(0, 0), (2, 1)]:  # same resampled prompts for every column: each = its own 1-D bootstrap
        assert bootstrap_ci(values[:, i, j], n_resamples=300) == pytest.approx((low[i, j], high[i, j]), abs=1e-12)
    lo, hi = bootstrap_ci([1.0, 2, 3, 4, 100], np.median, n_resamples=200)
    assert 1.0 <= lo <= 3 <= hi <= 100
    assert bootstrap_ci([1.0, 2, 3, 4, 100], lambda v: float(np.median(v)), n_resamples=200) == (lo, hi)


def test_bootstrap_ci_in_batches_keeps_the_interval(monkeypatch):
    values = np.random.default_rng(5).normal(size=(30, 4))
    whole = bootstrap_ci(values, n_resamples=400, axis=0)
    monkeypatch.setattr(stats, "_BATCH_ELEMENTS", 30 * 4 * 7)  # 7 resamples at a time
    batched = bootstrap_ci(values, n_resamples=400, axis=0)
    np.testing.assert_allclose(batched[0], whole[0], atol=0.15)
    np.testing.assert_allclose(batched[1], whole[1], atol=0.15)
    assert (batched[0] < values.mean(0)).all() and (values.mean(0) < batched[1]).all()


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    low, high = bootstrap_ci(np.ones((1, 3)), axis=0)
    assert low.tolist() == high.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(DataError, match="no values"):
        bootstrap_ci([])


# ------------------------------------------------------------------ paired / clustered
def test_paired_bootstrap_ci_with_distinct_clusters_is_the_unclustered_one():
    diffs = np.random.default_rng(1).choice([-1.0, 0.0, 0.0, 1.0, 1.0], size=120)
    plain = paired_bootstrap_ci(diffs, n_resamples=800, seed=3)
    labels = [f"q{i}" for i in np.random.default_rng(2).permutation(120)]  # distinct, in any order
    assert paired_bootstrap_ci(diffs, labels, n_resamples=800, seed=3) == pytest.approx(plain, abs=1e-12)
    assert plain[0] < diffs.mean() < plain[1]


def test_paired_bootstrap_ci_resamples_whole_clusters():
    diffs = np.random.default_rng(4).normal(0.2, 1.0, 60)
    repeated = np.repeat(diffs, 5)  # each question's difference at 5 positions
    question = np.repeat(np.arange(60), 5)
    naive = paired_bootstrap_ci(repeated, n_resamples=1000)
    clustered = paired_bootstrap_ci(repeated, question, n_resamples=1000)
    assert clustered[1] - clustered[0] > 1.8 * (naive[1] - naive[0])  # ≈ √5 wider
    # identical rows within a cluster: the cluster bootstrap is the bootstrap of the 60 questions
    assert clustered == pytest.approx(paired_bootstrap_ci(diffs, n_resamples=1000), abs=1e-12)
    assert clustered[0] < repeated.mean() < clustered[1]


def test_paired_bootstrap_ci_weights_clusters_by_size_and_checks_labels():
    diffs = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.5])
    low, high = paired_bootstrap_ci(diffs, clusters=[0, 0, 0, 1, 1, 2], n_resamples=2000)
    assert 0.0 <= low < diffs.mean() < high <= 1.0
    assert paired_bootstrap_ci(diffs, clusters=["a"] * 6) == (pytest.approx(diffs.mean()),) * 2
    with pytest.raises(DataError, match="6 differences but 5"):
        paired_bootstrap_ci(diffs, clusters=[0, 0, 1, 1, 2])
    with pytest.raises(DataError, match="missing"):
        paired_bootstrap_ci(diffs, clusters=[0, 0, 1, None, 2, 2])


def test_wilson_of_a_mean_over_draws_uses_the_fraction_not_a_rounded_count():
    # 0.5625 = 22.5 / 40 (three random draws averaged): the interval is centred on it, not on 22/40
    low, high = wilson_interval(0.5625, 40)
    assert (round(low, 3), round(high, 3)) == (0.41, 0.704)
    assert wilson_interval(0.55, 40) != (low, high)
    assert wilson_interval(22 / 40, 40) == pytest.approx(wilson_interval(0.55, 40), abs=1e-12)
