"""figures/: every figure is drawn from saved results; README lists what exists."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny

from focuslens import make_synthetic_qa, score_heads
from focuslens.directions import FocusDirections
from focuslens.errors import DataError
from focuslens.figures import FIGURES, draw_contextual_heads, draw_cross_family, write_readme


@pytest.mark.filterwarnings("ignore:no PNG")
def test_cross_family_figures_from_saved_results(tmp_path, shared_data):
    model = get_tiny("llama", 2)
    scores = score_heads(model, make_synthetic_qa(3, n_documents=4, seed=0), n_bootstrap=0, quiet=True)
    scores.save(tmp_path / "contextual_heads.json")
    g = torch.Generator().manual_seed(0)
    FocusDirections(torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g) * 0.01,
                    scores.ranking(), {"model": scores.metadata["model"]}).save(tmp_path / "focus_directions")
    written = draw_cross_family(tmp_path, shared_data / "focus-direction-release")
    names = {p.name for p in written}
    for stem in ("head_locations", "direction_norms", "norm_vs_rank", "direction_similarity_llama",
                 "direction_similarity_qwen"):
        assert f"{stem}.html" in names, stem
    readme = write_readme(tmp_path).read_text()
    assert "head_locations.html" in readme and "split_softmax" not in readme  # only what exists is listed
    assert all(stem in FIGURES for stem in ("head_locations", "direction_norms", "topk_overlap"))


def test_missing_results_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"contextual_heads\.json is missing: run `make demo`"):
        draw_contextual_heads(tmp_path)
