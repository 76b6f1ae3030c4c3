"""The demo end to end on a tiny model: every stage, every figure, results passed in memory,
one prefill per test prompt, and a saved run that redraws from disk without the model."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
from conftest import get_tiny

from focuslens.experiments.figures import draw_all
from focuslens.experiments.pipeline import STAGES, DemoSettings, load_results, run_demo
from focuslens.io import json_safe

TINY = DemoSettings(n_prompts=4, n_settings=2, n_pairs=2, n_candidates=2, n_ablation=2, ablation_ks=(1, 2),
                    n_train=3, n_validation=2, n_test=5, split_ks=(1, 2), taus=(0.5,), n_random=1, focus_ks=(1, None),
                    alphas=(-0.5, 0.5), refine=(0.8,), demo_cell=False)
PICTURES = ("distraction", "contextual_heads", "patching_agreement", "split_softmax", "focus_directions",
            "focus_directions_5_documents", "document_attention", "key_bias", "head_locations", "direction_norms",
            "norm_vs_rank", "topk_overlap")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no PNG", UserWarning)  # a machine without chromium: HTML only
        warnings.filterwarnings("ignore", "pairs .* have LD_clean", UserWarning)  # a random model's pairs
        results = run_demo(get_tiny("llama", 2), settings=TINY, out_dir=out, quiet=True)
    return out, results


def test_every_stage_runs_and_every_figure_is_drawn(demo):
    out, results = demo
    assert tuple(results) == STAGES
    for stem in PICTURES:
        assert (out / f"{stem}.html").exists(), stem
    assert (out / "token_view.html").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(STAGES) <= set(summary)
    run = summary["demo_run"]
    assert run["n_test_prompts"] == 5 and set(run["stage_seconds"]) == set(STAGES)


def test_one_prefill_per_test_prompt_serves_both_sweeps(demo):
    out, results = demo
    run = json.loads((out / "summary.json").read_text())["demo_run"]
    assert run["prefills_per_test_prompt"] == 1.0
    # both sweeps saw every test prompt: the store was asked twice per prompt
    assert results["split_softmax"]["split_softmax_sweep"].example.nunique() == 5
    assert results["focus_directions"]["focus_directions_test"].example.nunique() == 5


def test_stages_hand_each_other_their_objects(demo):
    _, results = demo
    scores = results["contextual_heads"]["contextual_heads"]
    dirs = results["focus_directions"]["focus_directions"]
    assert dirs.ranking() == scores.ranking()  # the directions carry the stage's ranking, not a re-read file
    views = results["prompt_views"]
    assert list(views["document_attention"].index) == scores.top_k(len(views["document_attention"]))
    assert views.summary["alpha"] == results["focus_directions"].summary["best"]["alpha"]
    example = views.objects["prompt"].example
    assert example.gold_index == 9 and views.summary["example"]["question"] == example.question  # gold in the middle


def test_a_saved_run_loads_back_equal_and_redraws_without_the_model(demo, tmp_path):
    out, results = demo
    loaded = load_results(out)
    assert tuple(loaded) == STAGES
    for section, stage in results.items():
        again = loaded[section]
        assert again.summary == json.loads(json.dumps(json_safe(stage.summary))), section  # NaN is saved as null
        for name, frame in stage.tables.items():
            if "heads" in frame:  # lists of heads come back as their text
                frame = frame.drop(columns="heads")
            pd.testing.assert_frame_equal(again[name][list(frame.columns)], frame, check_dtype=False,
                                          check_index_type=False, check_column_type=False, atol=1e-6,
                                          obj=f"{section}.{name}")
        for name, artifact in stage.artifacts.items():
            assert type(again[name]) is type(artifact)
    tokenizer = get_tiny("llama", 2).tokenizer
    written = draw_all(loaded, tmp_path, tokenizer=tokenizer)
    assert {p.stem for p in written} >= set(PICTURES) | {"token_view"}


def test_the_gpu_check_reads_a_demo_summary():
    """benchmarks/gpu_check.py runs only on a GPU; what it reports is taken from the demo's
    summary.json, checked here on the committed CPU run's."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check", root / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    summary = json.loads((root / "figures" / "summary.json").read_text())
    got = gpu_check.gpu_result(summary, device="H200", dtype="bfloat16", size="full", load_seconds=3.04,
                               peak_bytes=3 * 2**30)
    assert got["seconds"] == summary["demo_run"]["seconds"] and got["peak_gpu_memory_gib"] == 3.0
    assert got["accuracy"]["distraction"]["20"] == summary["distraction"]["accuracy"]["20"]
    assert set(got["stage_seconds"]) >= {"distraction", "split_softmax", "focus_directions"}


def test_the_gpu_long_context_check_runs_its_cases_on_a_tiny_config():
    """The GPU's long-context check, on the CPU with a tiny Llama config at short lengths:
    every case runs on its path and reports a time (the numbers themselves need a GPU)."""
    import importlib.util
    from pathlib import Path

    import torch

    from focuslens.model.testing import tiny_tokenizer

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check", root / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    config = dict(gpu_check.LLAMA_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=len(tiny_tokenizer()),
                  max_position_embeddings=4096)
    got = gpu_check.long_context_check((300, 600), device="cpu", dtype=torch.float32, config=config, repeats=1)
    cases = {"hf_sdpa", "bridge", "span_masses", "split_softmax", "focus", "eager_forward", "eager_span_masses"}
    for T in ("300", "600"):
        assert set(got[T]) == cases and all(got[T][c]["seconds"] > 0 for c in cases)


def test_a_killed_demo_resumes_from_its_saved_stages_with_the_same_numbers(demo, tmp_path, monkeypatch):
    """Kill the demo in the focus-directions stage; the rerun reads the four finished stages
    back, runs the rest, and gives the numbers of the uninterrupted run."""
    import focuslens.experiments.pipeline as pipeline

    out, results = demo
    real = pipeline.run_focus_directions

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_focus_directions", killed)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.filterwarnings("ignore")
        run_demo(get_tiny("llama", 2), settings=TINY, out_dir=tmp_path, quiet=True)
    progress = json.loads((tmp_path / "summary.json").read_text())["demo_progress"]
    assert progress["done"] == sorted(["distraction", "contextual_heads", "patching", "split_softmax"])
    # killed again in the 5-document stage: both sweeps are then read back, and their prefill count with them
    calls = []

    def killed_second(*args, **kwargs):
        calls.append(kwargs.get("section"))
        if kwargs.get("section") == "focus_directions_5_documents":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_focus_directions", killed_second)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.filterwarnings("ignore")
        run_demo(get_tiny("llama", 2), settings=TINY, out_dir=tmp_path, quiet=True)
    assert calls == [None, "focus_directions_5_documents"]
    assert json.loads((tmp_path / "summary.json").read_text())["demo_progress"]["prefills_per_test_prompt"] == 1.0
    monkeypatch.setattr(pipeline, "run_focus_directions", real)
    ran = []
    monkeypatch.setattr(pipeline, "run_distraction", lambda *a, **k: ran.append("distraction"))  # must not run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        resumed = run_demo(get_tiny("llama", 2), settings=TINY, out_dir=tmp_path, quiet=True)
    assert ran == [] and tuple(resumed) == STAGES
    def numbers(summary):  # everything but wall times
        if isinstance(summary, dict):
            return {k: numbers(v) for k, v in summary.items() if "seconds" not in k}
        return summary

    assert json.loads((tmp_path / "summary.json").read_text())["demo_run"]["prefills_per_test_prompt"] == 1.0
    for section in ("split_softmax", "focus_directions", "focus_directions_5_documents"):
        want = json.loads(json.dumps(json_safe(results[section].summary)))
        assert numbers(resumed[section].summary) == numbers(want), section
    other = TINY.__class__(**{**TINY.__dict__, "n_prompts": 5})  # other settings: nothing is reused
    assert pipeline._Progress(tmp_path, get_tiny("llama", 2), other).done == set()
