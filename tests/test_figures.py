"""figures/: every figure is drawn from stage results in memory; README lists what exists."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny

from focuslens import make_synthetic_qa, score_heads
from focuslens.directions import FocusDirections
from focuslens.errors import DataError
from focuslens.figures import FIGURES, draw_cross_family, write_readme
from focuslens.pipeline import load_release
from focuslens.stages import load_stage


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
