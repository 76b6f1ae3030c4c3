"""figures/: every figure is drawn from stage results in memory; README lists what exists."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny

from focuslens import make_synthetic_qa, score_heads
from focuslens.directions.artifact import FocusDirections
from focuslens.errors import DataError
from focuslens.experiments.figures import FIGURES, draw_cross_family, write_readme
from focuslens.experiments.pipeline import load_release
from focuslens.experiments.stages import load_stage


@pytest.mark.filterwarnings("ignore:no PNG")
def test_cross_family_figures_from_results_in_memory(tmp_path, shared_data):
    model = get_tiny("llama", 2)
    scores = score_heads(model, make_synthetic_qa(3, n_documents=4, seed=0), n_bootstrap=0, quiet=True)
    g = torch.Generator().manual_seed(0)
    ours = FocusDirections(torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g) * 0.01,
                           scores.ranking(), {"model": scores.metadata["model"]})
    released = load_release(shared_data / "focus-direction-release")
    assert len(released) == 2  # the paper's two models, imported once
    written = draw_cross_family(tmp_path, scores, ours, released)
    names = {p.name for p in written}
    for stem in ("head_locations", "direction_norms", "norm_vs_rank", "direction_similarity_llama",
                 "direction_similarity_qwen"):
        assert f"{stem}.html" in names, stem
    readme = write_readme(tmp_path).read_text()
    assert "head_locations.html" in readme and "split_softmax" not in readme  # only what exists is listed
    assert all(stem in FIGURES for stem in ("head_locations", "direction_norms", "topk_overlap"))


def test_a_missing_stage_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"summary\.json has no 'contextual_heads' section: run `make demo`"):
        load_stage(tmp_path, "contextual_heads")


# ---------------------------------------------------------------- sweep figures (no model)
def _focus_rows(n_prompts=100, ks=(1, 5, 20), alphas=(-0.5, 0.0, 0.5, 1.0, 2.0), seed=0):
    """focus_sweep-like rows with accuracies around 0.1 (the demo's regime)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    u = rng.random(n_prompts)
    return pd.DataFrame([dict(k=k, alpha=a, example=ex, correct=float(u[ex] < 0.08 + 0.02 * i + 0.01 * a),
                              gold_mass=0.05 * a + 0.01 * i, n_documents=20)
                         for i, k in enumerate(ks) for a in alphas for ex in range(n_prompts)])


def _split_rows(n_draws, n_prompts=40):
    import pandas as pd

    rows = [dict(group=g, tau=tau, k=k, draw=d, example=ex, correct=float((ex + d + k) % 7 == 0), n_documents=20)
            for g in ("top", "random") for tau in (0.8, 0.1) for k in (1, 5)
            for d in (range(n_draws) if g == "random" else [0]) for ex in range(n_prompts)]
    return pd.DataFrame(rows)


def _reference_traces(fig):
    return [t for t in fig.data if t.legendgroup == "references"]


def test_focus_sweep_fits_the_accuracy_axis_to_the_data_with_wilson_cis():
    from focuslens.measure.stats import wilson_interval
    from focuslens.viz import plot_focus_sweep

    sweep = _focus_rows()
    refs = {"gold_only": 1.0, "baseline": 0.12, "no_gold": 0.03}
    fig = plot_focus_sweep(sweep, references=refs, chosen={"k": 5, "alpha": 1.0})
    lo_axis, hi_axis = fig.layout.yaxis.range
    acc_traces = [t for t in fig.data if t.xaxis == "x" and (t.name or "").startswith("k =")]
    assert len(acc_traces) == 3
    ci_lo, ci_hi = [], []
    for t in acc_traces:
        k = int(t.name.split("=")[1].split()[0])
        for alpha, y, plus, minus in zip(t.x, t.y, t.error_y.array, t.error_y.arrayminus):
            rows = sweep[(sweep.k == k) & (sweep.alpha == alpha)]
            lo, hi = wilson_interval(rows.correct.mean(), len(rows))
            assert y == pytest.approx(rows.correct.mean())
            assert (y - minus, y + plus) == pytest.approx((lo, hi))  # the Wilson 95% interval
            ci_lo.append(lo)
            ci_hi.append(hi)
    assert lo_axis <= min(ci_lo) and hi_axis >= max(ci_hi)  # brackets the data and its CIs
    assert hi_axis - lo_axis < 0.5, "the gold-only line at 1.0 squashes the data into a strip again"
    lines = [s.y0 for s in fig.layout.shapes if s.type == "line"]
    assert sorted(lines) == pytest.approx([0.03, 0.12]) and all(lo_axis <= y <= hi_axis for y in lines)
    names = [t.name for t in _reference_traces(fig)]
    assert names == ["gold document only (1.00), above the axis", "unsteered (0.12)", "gold document removed (0.03)"]
    assert not [a for a in fig.layout.annotations if "unsteered" in (a.text or "")], "labels over the data"


@pytest.mark.parametrize("plot", ["focus", "split"])
def test_reference_labels_of_close_values_are_merged_not_overprinted(plot):
    from focuslens.viz import plot_focus_sweep, plot_split_softmax_sweep

    refs = {"gold_only": 0.5, "baseline": 0.0, "no_gold": 0.002}
    fig = plot_focus_sweep(_focus_rows(), references=refs) if plot == "focus" else \
        plot_split_softmax_sweep(_split_rows(3), references=refs)
    names = [t.name for t in _reference_traces(fig)]
    assert names[-1] == "unsteered, gold document removed (0.00)" and len(names) == 2, names
    # labels live in the legend, one entry per distinct line: nothing prints on top of another
    lines = sorted(s.y0 for s in fig.layout.shapes if s.type == "line")
    assert all(b - a > 0.01 for a, b in zip(lines, lines[1:])), lines


def test_one_random_draw_says_1_draw_and_draws_no_error_bar(monkeypatch, tmp_path):
    from focuslens.experiments import figures
    from focuslens.experiments.stages.base import StageResult
    from focuslens.viz import plot_split_softmax_sweep

    one, three = plot_split_softmax_sweep(_split_rows(1)), plot_split_softmax_sweep(_split_rows(3))
    assert "1 draw " in one.layout.title.text and "1 draws" not in one.layout.title.text
    assert "s.d. over" not in one.layout.title.text
    assert "mean ± s.d. over 3 draws" in three.layout.title.text
    random_one = [t for t in one.data if (t.name or "").startswith("random")]
    random_three = [t for t in three.data if (t.name or "").startswith("random")]
    assert random_one and all(t.error_y.array is None for t in random_one)
    assert random_three and all(t.error_y.array is not None for t in random_three)
    # the demo's own title too
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, out, stem, **size: drawn.append(fig) or [])
    stage = StageResult("split_softmax", {"model": "m", "baseline": 0.0, "no_gold": 0.0},
                        {"split_softmax_sweep": _split_rows(1)})
    figures.draw_split_softmax(stage, tmp_path)
    assert "random: 1 draw" in drawn[0].layout.title.text and "1 draws" not in drawn[0].layout.title.text


def test_rank_agreement_labels_the_strongest_heads_by_y_and_the_highlighted():
    from focuslens.viz import plot_rank_agreement

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 5, generator=g) * 0.05, torch.randn(6, 5, generator=g) * 0.003
    strong = {(1, 2): 0.24, (3, 0): 0.16, (3, 1): 0.155, (4, 4): 0.15, (0, 3): 0.14, (5, 1): 0.13}
    for (layer, head), v in strong.items():
        y[layer, head] = v
    x[3, 0], x[3, 1] = 0.02, 0.0202  # two strong heads side by side: their labels must not coincide
    fig = plot_rank_agreement(x, y, x_label="x", y_label="y", title="t", highlight=[(2, 2), (1, 2)])
    texts = [a.text for a in fig.layout.annotations]
    top5 = {f"L{layer}H{head}" for layer, head in list(strong)[:5]}
    assert top5 <= set(texts) and "L2H2" in texts  # the top 5 by y and the highlighted heads
    assert "L5H1" not in texts and len(texts) == len(set(texts)) == 6  # only those, each once
    # the grey labels of the neighbours (3, 0) and (3, 1) go to different offsets
    grey = [a for a in fig.layout.annotations if a.font.color == "#333"]
    assert len(grey) == 4 and len({(a.ax, a.ay) for a in grey if a.text in ("L3H0", "L3H1")}) == 2
