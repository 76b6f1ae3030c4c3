"""The family comparison end to end on two tiny models of different architectures (a
Llama and a Gemma-3-style one with sliding-window layers): each runs the demo pipeline
with one recipe, a finished run is reused, and the summary's numbers are those of the
stages it compares."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import torch
import pandas as pd
import pytest
from conftest import get_tiny
from test_pipeline import TINY

from focuslens.errors import DataError
from focuslens.experiments.families import families_summary, finished_run, global_layers, run_families
from focuslens.experiments.pipeline import load_results
from focuslens.measure.stats import wilson_interval
from focuslens.viz.compare import relative_depth


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    models = [get_tiny("llama", 2), get_tiny("gemma3", 1)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no PNG", UserWarning)
        warnings.filterwarnings("ignore", "pairs .* have LD_clean", UserWarning)
        summary = run_families(models, settings=TINY, out_dir=out, quiet=True)
    return out, models, summary


def test_both_families_run_with_one_recipe_and_are_compared(families):
    out, models, summary = families
    names = [str(m.cfg.model_name) for m in models]
    assert list(summary["models"]) == names
    for stem in ("families", "families_head_locations", "families_direction_norms", "families_norm_vs_rank"):
        assert (out / f"{stem}.html").exists(), stem
    assert json.loads((out / "summary.json").read_text())["families"]["models"].keys() == set(names)
    assert (out / "families.csv").read_text().count("\n") == 3  # a header and one row per model
    assert global_layers(models[0]) == [] and global_layers(models[1]) == [1]  # tiny Gemma: layer 0 sliding, 1 global


def test_the_summary_reads_each_models_own_stages(families):
    out, models, summary = families
    for model in models:
        name = str(model.cfg.model_name)
        stages = load_results(out / name)
        cell = summary["models"][name]
        d = stages["distraction"].summary
        for n_docs, acc in d["accuracy"].items():
            assert cell["distraction"][n_docs]["accuracy"] == acc
            assert cell["distraction"][n_docs]["ci"] == pytest.approx(list(wilson_interval(acc, d["n_prompts"])))
        top = stages["contextual_heads"]["contextual_heads"].ranking()[:20]
        assert cell["heads"]["top"] == [list(h) for h in top]
        depths = sorted(float(relative_depth(layer, model.cfg.n_layers)) for layer, _ in top)
        assert depths[0] <= cell["heads"]["relative_depth_median"] <= depths[-1]
        f = stages["focus_directions"].summary
        assert cell["focus"]["test"] == f["best"]["test_acc"] and cell["focus"]["k"] == f["best"]["k"]
        sp, mine = stages["split_softmax"].summary, cell["split_softmax"]
        assert (mine["k"], mine["tau"]) == (2, 0.5)  # the largest k <= 20 and the smallest tau the recipe ran
        assert mine["top_k"] == sp["contextual"]["2"]["0.5"] and mine["random_k"] == sp["random"]["2"]["0.5"]
    gemma = summary["models"][str(models[1].cfg.model_name)]["heads"]
    share = sum(layer == 1 for layer, _ in gemma["top"]) / len(gemma["top"])
    assert gemma["share_in_global_layers"] == share


def test_key_bias_on_one_shared_prompt_and_depth_overlap(families):
    from focuslens.data import render
    from focuslens.directions.artifact import bias_by_part
    from focuslens.experiments.stages.steer import example_from_json

    out, models, summary = families
    table = pd.read_csv(out / "families_key_bias.csv")
    names = [str(m.cfg.model_name) for m in models]
    assert list(dict.fromkeys(table.model)) == names
    parts = {name: g.part.tolist() for name, g in table.groupby("model")}
    assert parts[names[0]] == parts[names[1]]  # one prompt, the same parts whatever the tokenizer
    for model in models:  # each model's rows: its saved key bias averaged over its own tokenization
        name = str(model.cfg.model_name)
        view = load_results(out / name)["prompt_views"]
        prompt = render(example_from_json(view.summary["example"]), model.tokenizer, max_length=model.cfg.n_ctx)
        want = bias_by_part(view.tables["key_bias"], prompt)
        mine = table[table.model == name].set_index("part")
        np.testing.assert_allclose(mine["mean"], want.mean(axis=0).loc[mine.index], rtol=1e-5, atol=1e-7)
        assert mine.gold.sum() == 1 and mine.gold[want.attrs["gold"]]
        assert (mine.n_heads == len(want)).all()
    overlap = pd.DataFrame(summary["depth_overlap"])
    assert set(overlap.columns) == set(names) and np.allclose(np.diag(overlap.loc[names, names]), 1)
    assert (out / "families_key_bias.html").exists() and (out / "families_depth_overlap.html").exists()


def test_every_model_is_also_swept_with_every_row_steered(families):
    from focuslens.experiments.families import ALL_ROWS, ALL_ROWS_SECTION

    out, models, summary = families
    for model in models:
        name = str(model.cfg.model_name)
        stages = load_results(out / name) | {}
        from focuslens.experiments.stages.base import load_stage

        stage = load_stage(out / name, ALL_ROWS_SECTION)
        s, cell = stage.summary, summary["models"][name]["focus_all_rows"]
        assert s["rows"] == "all" and cell["test"] == s["best"]["test_acc"] and cell["baseline"] == s["baseline_test"]
        test = stage.tables[f"{ALL_ROWS_SECTION}_test"]
        assert sorted(test.alpha.unique()) == sorted({0.0, *ALL_ROWS["alphas"]})
        # the same trained directions as the answer-row stage, and the same test prompts
        trained = stages["focus_directions"]["focus_directions"]
        assert torch.equal(stage[ALL_ROWS_SECTION].q, trained.q)
        assert test.example.nunique() == stages["focus_directions"].tables["focus_directions_test"].example.nunique()
        # α = 0 is the unsteered model whichever rows are steered: both stages' baselines agree
        assert s["baseline_test"] == stages["focus_directions"].summary["baseline_test"]


def test_a_finished_model_is_reused_not_run_again(families, capsys):
    out, models, summary = families
    again = run_families(models, settings=TINY, out_dir=out, quiet=True)
    # every saved stage of both models read back; only the prompt views (a few forwards) are redrawn
    assert capsys.readouterr().out.count("(resumed run)") == 2 * 6
    assert again["models"] == json.loads(json.dumps(summary["models"]))
    assert families_summary({}, {}) == {"models": {}}


def test_a_finished_demo_folder_is_read_not_run_and_other_settings_refused(families, tmp_path):
    out, models, summary = families
    name = str(models[0].cfg.model_name)
    again = run_families(models, settings=TINY, out_dir=tmp_path, reuse={name: out / name}, quiet=True)
    assert not (tmp_path / name).exists()  # read from the given folder, not run into this one
    assert again["models"][name] == json.loads(json.dumps(summary["models"][name]))
    with pytest.raises(DataError, match="seed=0, not 1"):
        run_families(models, settings=replace(TINY, seed=1), out_dir=tmp_path, reuse={name: out / name}, quiet=True)
    with pytest.raises(DataError, match="not among models"):
        run_families(models, settings=TINY, out_dir=tmp_path, reuse={"other": out / name}, quiet=True)
    with pytest.raises(DataError, match="no finished demo run"):
        finished_run(tmp_path / "nowhere", models[0], TINY)


def test_head_locations_mark_the_given_layers_in_that_models_panel_only():
    from focuslens.viz.cross_model import plot_head_locations

    ranking = [(0, 1), (3, 2), (5, 0)]
    fig = plot_head_locations({"a": (ranking, 6, 4), "b": (ranking, 6, 4)}, top_k=3, marked_layers={"b": [5]})
    dashed = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(dashed) == 2  # across b's panel, and b's column of the strip
    assert {s.xref for s in dashed} == {"x2 domain", "x3"} and all(s.y0 == s.y1 == 1.0 for s in dashed)
