"""The ``focuslens`` command: errors exit 2 with a message, distraction writes its outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from plotly.offline import get_plotlyjs_version

from focuslens.experiments.cli import main
from focuslens.io import update_summary
from focuslens.measure.scoring import HeadScores

PLOTLY_JS = f"plotly.js v{get_plotlyjs_version()}"  # the banner of the inlined bundle


def test_unknown_model_exits_2_and_names_the_spec(capsys):
    assert main(["info", "--model", "not-a-model"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("focuslens: error:")
    assert "'not-a-model'" in captured.err and captured.out == ""


def test_info_prints_the_shape(capsys, tiny_llama_dir):
    assert main(["info", "--model", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{tiny_llama_dir.name}: 2 layers, 4 heads, 2 KV heads, d_head 16, n_ctx" in out


def test_bad_arguments_exit_through_argparse(capsys):
    with pytest.raises(SystemExit) as err:
        main(["distraction", "--n-prompts", "many"])
    assert err.value.code == 2 and "--n-prompts" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:no PNG")
def test_distraction_writes_summary_and_offline_html(tmp_path, tiny_llama_dir, capsys):
    argv = ["distraction", "--model", str(tiny_llama_dir), "--n-prompts", "3", "--n-documents", "1", "3"]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    section = summary["distraction"]
    assert section["model"] == tiny_llama_dir.name and section["task"] == "synthetic" and section["seed"] == 0
    assert section["n_prompts"] == 3
    assert set(section["accuracy"]) == set(section["candidate_accuracy"]) == {"1", "3"}
    assert section["candidate_accuracy"]["1"] is None  # one document: no candidate to beat (NaN, saved as null)
    assert all(0.0 <= a <= 1.0 for a in section["accuracy"].values())
    assert set(section["by_gold_position_3"]) == {"first", "middle", "last"}

    html = (tmp_path / "distraction.html").read_text()
    assert "<html" in html and PLOTLY_JS in html  # plotly.js is inlined
    assert not re.search(r"<script[^>]*\bsrc=[\"']?(https?:)?//", html)
    csv = (tmp_path / "distraction.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 * 2 + 3 * 3  # header, 2 random settings, 3 positions
    out = capsys.readouterr().out
    assert "Distraction table (3 prompts per row" in out


@pytest.mark.filterwarnings("ignore:no PNG")
def test_train_directions_then_steer_with_them(tmp_path, tiny_llama_dir, capsys):
    model = ["--model", str(tiny_llama_dir), "--quiet"]
    art = tmp_path / "dirs"
    argv = ["train-directions", *model, "--n-score-prompts", "6", "--n-train", "4", "--n-validation", "2",
            "--n-documents", "5", "--epochs", "2", "--out", str(art)]
    assert main(argv) == 0
    assert (art / "focus_directions.safetensors").exists() and (tmp_path / "contextual_heads.json").exists()
    meta = json.loads((art / "focus_directions.json").read_text())
    assert meta["shape"] == [2, 4, 16] and len(meta["ranking"]) == 8
    assert meta["metadata"]["settings"]["epochs"] == 2 and meta["metadata"]["data"]["n_train"] == 4

    out = tmp_path / "steer"
    argv = ["steer", "focus", *model, "--directions", str(art), "--scores", str(tmp_path / "contextual_heads.json"),
            "--n-test", "5", "--n-validation", "3", "--n-documents", "5", "--ks", "1", "0",
            "--alphas", "-0.5", "1", "--out", str(out)]
    assert main(argv) == 0
    fd = json.loads((out / "summary.json").read_text())["focus_directions"]
    assert fd["n_test"] == 5 and fd["best"]["k"] in (1, 8) and fd["best"]["alpha"] in (-0.5, 0.0, 1.0, 0.6, 0.8, 1.25, 1.5)
    assert set(fd["test_accuracy_grid"]) == {"1", "8"}
    assert set(fd["by_gold_position_test"]["baseline"]) == {"1", "2", "3", "4", "5"}  # Document [1] … [5], as the prompt numbers them
    assert (out / "focus_directions.html").exists()

    argv = ["steer", "split-softmax", *model, "--scores", str(tmp_path / "contextual_heads.json"), "--n-test", "5",
            "--n-documents", "5", "--ks", "1", "2", "--taus", "0.5", "0.1", "--n-random", "2", "--out", str(out)]
    assert main(argv) == 0
    ss = json.loads((out / "summary.json").read_text())["split_softmax"]
    assert set(ss["contextual"]) == {"1", "2"} and set(ss["contextual"]["1"]) == {"1.0", "0.5", "0.1"}
    assert ss["contextual"]["1"]["1.0"] == ss["baseline"] == ss["random"]["2"]["1.0"]
    assert 0 <= ss["gold_only"] <= 1 and ss["n_test"] == 5
    assert "focus_directions" in json.loads((out / "summary.json").read_text())  # sections are merged
    assert "Split-softmax on 5 held-out prompts" in capsys.readouterr().out


def test_a_missing_input_is_one_line_before_any_model_loads(tmp_path, capsys):
    code = main(["patch", "--model", "no-such-model", "--scores", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("focuslens: error: --scores") and "missing.json: no such file" in err[0]
    (tmp_path / "file").write_text("x")
    assert main(["distraction", "--model", "no-such-model", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file, not a folder" in err


def test_debug_shows_the_traceback(tmp_path):
    from focuslens import DataError

    with pytest.raises(DataError, match="no such file"):
        main(["--debug", "patch", "--scores", str(tmp_path / "missing.json")])


@pytest.mark.filterwarnings("ignore:no PNG")
@pytest.mark.filterwarnings("ignore:pairs .* have LD_clean")  # a random model's counterfactual pairs
def test_every_command_runs_small_and_score_writes_what_patch_reads(tmp_path, tiny_llama_dir, capsys):
    model = ["--model", str(tiny_llama_dir), "--quiet"]
    runs = tmp_path / "runs"
    assert main(["score", *model, "--n-prompts", "4", "--out", str(runs / "score")]) == 0
    scores = runs / "score" / "contextual_heads.json"
    assert scores.exists() and f"focuslens patch --scores {scores}" in capsys.readouterr().out
    assert main(["patch", *model, "--scores", str(scores), "--n-pairs", "2", "--n-candidates", "2",
                 "--n-ablation", "2", "--out", str(runs / "patch")]) == 0
    patching = json.loads((runs / "patch" / "summary.json").read_text())["patching"]
    assert patching["n_pairs"] == 2 and patching["group_ablation"]["n_prompts"] == 2
    assert main(["demo", *model, "--n-prompts", "4", "--out", str(runs / "demo")]) == 0
    assert "prefills per test prompt: 1.00" in capsys.readouterr().out
    assert main(["figures", *model, "--out", str(runs / "demo")]) == 0  # redrawn from the saved stages
    assert "running the quick demo first" not in capsys.readouterr().out


def test_score_with_two_processes_writes_the_scores_of_one(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = ["--model", str(tiny_llama_dir), "--quiet", "--n-prompts", "5", "--n-documents", "3"]
    assert main(["score", *model, "--out", str(tmp_path / "one")]) == 0
    assert main(["score", *model, "--processes", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = (HeadScores.load(tmp_path / d / "contextual_heads.json") for d in ("one", "two"))
    for metric in one.mean:
        torch.testing.assert_close(two.mean[metric], one.mean[metric], rtol=0, atol=1e-6)
    assert main(["score", *model, "--processes", "0"]) == 2


def test_counts_are_not_rounded_and_help_shows_defaults_and_an_example(capsys):
    assert main(["steer", "split-softmax", "--n-test", "4"]) == 2
    err = capsys.readouterr().err
    assert "--n-test 4" in err and "multiple of 5" in err  # before any model loads
    for command in ("demo", "distraction", "score", "patch", "train-directions", "steer", "figures", "experiment",
                    "info"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "example: focuslens " + command.split()[0] in text, command
        assert "(default: smollm2-135m-instruct)" in text, command  # every option shows its default


@pytest.mark.parametrize("content", ["{\"distraction\": {\"files\": {}", "[1, 2]", "\udcff"])
def test_figures_on_a_corrupt_summary_is_one_line_and_runs_no_demo(tmp_path, capsys, content):
    summary = tmp_path / "summary.json"
    summary.write_bytes(content.encode("utf-8", "surrogateescape"))
    (tmp_path / "distraction.csv").write_text("kept,as,is\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["figures", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("focuslens: error:") and str(summary) in err[0]
    assert "unexpected" not in err[0] and "running the quick demo" not in captured.out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the user's folder is untouched


def test_figures_on_a_partial_summary_names_the_missing_sections(tmp_path, capsys):
    update_summary(tmp_path / "summary.json", "distraction", {"files": {}})
    before = (tmp_path / "summary.json").read_text()
    assert main(["figures", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no contextual_heads, patching, split_softmax, focus_directions section(s)" in err
    assert f"focuslens demo --out {tmp_path}" in err and (tmp_path / "summary.json").read_text() == before


def test_a_corrupt_summary_is_never_replaced_by_the_next_stage(tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "summary.json").write_text("{\"contextual_heads\": ")
    argv = ["distraction", "--model", str(tiny_llama_dir), "--n-prompts", "2", "--n-documents", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "summary.json: cannot read a summary file" in err and "unexpected" not in err
    assert (tmp_path / "summary.json").read_text() == "{\"contextual_heads\": "


@pytest.mark.parametrize("argv,says", [
    (["--rankings", "bogus"], r"rankings=\['bogus'\]: unknown 'bogus'"),
    (["--all-rows", "synthetic"], r"all_rows: 'synthetic' is not a task/layout pair"),
    (["--tasks", "nq"], r"set nq_path \(--nq\)"),
    (["--layouts", "qa", "kv"], r"layouts=\['qa', 'kv'\]: unknown 'kv'"),
    (["--n-test", "0"], r"--n-test 0: must be at least 1"),
    (["--nq-questions", "40", "20", "0"], r"--nq-questions 0: must be at least 1"),
])
def test_experiment_arguments_are_refused_before_the_model_loads(tmp_path, capsys, argv, says):
    # --model names no model: an error about it would mean the arguments were checked too late
    assert main(["experiment", "focus", "--model", "no-such-model", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(says, err) and "no-such-model" not in err, err


@pytest.mark.parametrize("command", [["experiment", "focus"], ["distraction"], ["long-context"]])
def test_a_broken_summary_in_out_is_named_before_the_model_loads(tmp_path, capsys, command):
    (tmp_path / "summary.json").write_text('{"focus_conditions": [')
    assert main([*command, "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'summary.json'}: cannot read a summary file" in err and "no-such-model" not in err, err


def test_a_bogus_scores_file_is_named_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "scores.json").write_text('{"not": "scores"}')
    assert main(["patch", "--model", "no-such-model", "--scores", str(tmp_path / "scores.json"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "scores.json is not a focuslens HeadScores file" in err and "no-such-model" not in err, err


@pytest.mark.parametrize("argv,says", [
    (["steer", "split-softmax", "--taus", "0.5", "0"], "--taus 0.0: must be positive"),
    (["steer", "focus", "--alphas", "nan"], "--alphas nan: must be a finite number"),
    (["train-directions", "--epochs", "0"], "--epochs 0: must be at least 1"),
    (["long-context", "--kv-keys", "25", "-3"], "--kv-keys -3: must be at least 1"),
])
def test_numbers_are_checked_before_the_model_loads(tmp_path, capsys, argv, says):
    assert main([*argv, "--model", "no-such-model", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and "no-such-model" not in err, err
