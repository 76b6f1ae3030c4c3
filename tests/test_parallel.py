"""Data parallel over 2 CPU processes (gloo), launched with accelerate: scoring, evaluation,
both sweeps (next-token and generated), patching and the training caches (in memory and on
disk) give the same results as one process, in input order."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from focuslens.errors import ModelError
from focuslens.model import parallel

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, torch
    from focuslens.model import parallel
    from focuslens.data.synthetic import make_synthetic_qa
    from focuslens.measure.evaluate import evaluate_next_token
    from focuslens.steer.focus import focus_sweep
    from focuslens.causal.patching import make_counterfactual_pairs, patch_heads
    from focuslens.measure.scoring import prepare_prompts, score_heads
    from focuslens.steer.split_softmax import split_softmax_sweep
    from focuslens.directions.streamed import cache_to_disk
    from focuslens.model.testing import tiny_model
    from focuslens.directions.cache import collect_attention_inputs
    from focuslens.directions.train import train_directions

    model = tiny_model("llama", n_heads=4, n_kv_heads=2, seed=0)
    examples = make_synthetic_qa(7, n_documents=3, seed=1) + make_synthetic_qa(4, n_documents=5, seed=2)
    scores = score_heads(model, examples, n_bootstrap=50, quiet=True)
    rows = evaluate_next_token(model, examples, quiet=True)
    cache_to_disk(model, prepare_prompts(model, examples, quiet=True), sys.argv[1] + ".cache", chunk=3, quiet=True)
    prompts = prepare_prompts(model, examples, quiet=True)
    cache = collect_attention_inputs(model, prompts, quiet=True)
    patched = patch_heads(model, make_counterfactual_pairs(model, examples[:5], seed=3), quiet=True)
    ss, ss_logits = split_softmax_sweep(model, examples, [(0, 1), (1, 2)], ks=(1, 2), taus=(0.5,), n_random=1,
                                        rows="answer", return_logits=True, quiet=True)
    dirs = train_directions(model, examples[:4], examples[4:6], epochs=2, lr=0.1, seed=0, quiet=True,
                            ranking=[(1, 2), (0, 1), (1, 0)])
    fs = focus_sweep(model, dirs, examples, ks=(1, None), alphas=(0.5, 2.0), quiet=True)
    gen = focus_sweep(model, dirs, examples[:3], ks=(1,), alphas=(1.0,), max_new_tokens=2, quiet=True)
    rank, size = parallel.world()
    torch.save({"mean": scores.mean, "lo": scores.ci_low, "acc": scores.metadata["accuracy"], "size": size,
                "share": list(parallel.share(len(examples))), "gold_logit": rows.gold_logit.tolist(),
                "qid": rows.qid.tolist(), "cache": [cache.q, cache.k, cache.pattern, cache.row_pos, cache.gold],
                "patched": patched.per_example, "ld": patched.metadata["ld_clean"],
                "ss": ss.drop(columns=["heads"], errors="ignore").to_dict("list"), "ss_logits": ss_logits,
                "dq": dirs.q, "fs": fs.to_dict("list"), "gen": gen.to_dict("list")}, f"{sys.argv[1]}.{rank}.pt")
""")


def _launch(tmp_path, n: int) -> list[dict]:
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    cmd = parallel.launch_command(n) if n > 1 else [sys.executable]
    out = subprocess.run([*cmd, str(script), str(tmp_path / f"n{n}")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [torch.load(tmp_path / f"n{n}.{r}.pt") for r in range(n)]


def test_two_processes_score_like_one_in_input_order(tmp_path):
    one, (r0, r1) = _launch(tmp_path, 1)[0], _launch(tmp_path, 2)
    assert one["size"] == 1 and r0["size"] == r1["size"] == 2
    assert r0["share"] == list(range(0, 5)) and r1["share"] == list(range(5, 11))  # contiguous blocks
    for got in (r0, r1):  # every process holds the whole result
        for metric in one["mean"]:
            torch.testing.assert_close(got["mean"][metric], one["mean"][metric], rtol=0, atol=1e-6)
            torch.testing.assert_close(got["lo"][metric], one["lo"][metric], rtol=0, atol=1e-6)
        assert got["acc"] == one["acc"] and got["qid"] == one["qid"]  # evaluation rows in input order
        assert max(abs(a - b) for a, b in zip(got["gold_logit"], one["gold_logit"])) <= 1e-6
        for a, b in zip(got["cache"], one["cache"]):  # the in-memory training cache, whole on each
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for name in one["patched"]:  # exact and attribution patching, pair by pair
            torch.testing.assert_close(got["patched"][name], one["patched"][name], rtol=0, atol=1e-6, equal_nan=True)
        assert got["ld"] == pytest.approx(one["ld"], abs=1e-6)
        torch.testing.assert_close(got["ss_logits"], one["ss_logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["dq"], one["dq"], rtol=0, atol=1e-6)  # trained on the gathered cache
        for sweep in ("ss", "fs", "gen"):  # both sweeps, and the generated one, row by row
            assert got[sweep].keys() == one[sweep].keys() and len(got[sweep]["example"]) == len(one[sweep]["example"])
            for col, values in one[sweep].items():
                if isinstance(values[0], float):
                    assert got[sweep][col] == pytest.approx(values, abs=1e-6, nan_ok=True), (sweep, col)
                else:
                    assert got[sweep][col] == values, (sweep, col)
    assert len(one["fs"]["example"]) % 11 == 0 and len(one["fs"]["example"]) >= 11 * 4 and one["gen"]["prediction"][0] != ""
    # the training cache: each process wrote its chunks; the same files as one process
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(tmp_path / "n2.cache") == files(tmp_path / "n1.cache") and len(files(tmp_path / "n1.cache")) > 8


def test_one_process_is_the_identity():
    if os.environ.get("WORLD_SIZE", "1") != "1":
        pytest.skip("running under a launcher")
    assert parallel.world() == (0, 1) and parallel.share(5) == range(5) and parallel.is_main()
    x = torch.arange(6.0)
    assert parallel.cat(x, 6) is x and parallel.gather([1, 2]) == [1, 2]


@pytest.fixture
def plain_process(monkeypatch):
    """This process as a notebook kernel whose scheduler exported ``WORLD_SIZE=2`` (and the
    rest of torch's env:// rendezvous), with no launcher of ours around it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("running under a launcher")
    for name in (parallel.LAUNCHER_VARIABLE, parallel.OPT_IN_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29599")
    monkeypatch.setattr(parallel, "_asked", False)
    monkeypatch.setattr(parallel, "_warned", False)
    joins = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: joins.append(k))
    return joins


def test_world_size_alone_does_not_join_a_process_group(plain_process):
    from focuslens.data.synthetic import make_synthetic_qa
    from focuslens.measure.scoring import score_heads
    from focuslens.model.testing import tiny_model

    with pytest.warns(RuntimeWarning, match=r"WORLD_SIZE=2 is set, but no launcher .* one process \(rank 0 of 1\)"):
        assert parallel.world() == (0, 1)
    assert not parallel.distributed() and parallel.share(5) == range(5) and parallel.is_main()
    x = torch.arange(6.0)
    assert parallel.cat(x, 6) is x and parallel.gather([1, 2]) == [1, 2]
    with warnings.catch_warnings():  # said once: a notebook's later calls stay quiet
        warnings.filterwarnings("error", "WORLD_SIZE", RuntimeWarning)
        scores = score_heads(tiny_model("llama", n_heads=4, n_kv_heads=2, seed=0),
                             make_synthetic_qa(3, n_documents=3, seed=1), n_bootstrap=0, quiet=True)
    assert scores.metadata["n_examples"] == 3 and plain_process == []  # every prompt here, no group joined


@pytest.mark.parametrize("how", ["launcher", "env", "init"])
def test_a_process_group_is_joined_only_when_asked(plain_process, monkeypatch, how):
    if how == "launcher":  # torchrun's elastic agent, also under accelerate launch
        monkeypatch.setenv(parallel.LAUNCHER_VARIABLE, "none")
    elif how == "env":
        monkeypatch.setenv(parallel.OPT_IN_VARIABLE, "1")
    assert parallel.distributed() == (how != "init")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(plain_process))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (parallel.init() if how == "init" else parallel.world()) == (0, 2)
    assert plain_process == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=120)}]  # joined, once
    assert parallel.world() == (0, 2) and len(plain_process) == 1


@pytest.mark.parametrize("unset", [["RANK"], ["MASTER_ADDR", "MASTER_PORT"]])
def test_an_incomplete_launcher_environment_is_named_at_once(plain_process, monkeypatch, unset):
    for name in unset:
        monkeypatch.delenv(name)
    monkeypatch.setenv(parallel.OPT_IN_VARIABLE, "1")
    with pytest.raises(ModelError, match=rf"WORLD_SIZE=2 asks for several processes, but {', '.join(unset)} "):
        parallel.world()
    assert plain_process == []  # no rendezvous tried


def test_peers_that_never_arrive_fail_within_the_timeout(tmp_path):
    """Rank 0 of 2, alone, in a real process: a ModelError after the set wait, not torch's 30 minutes."""
    code = "from focuslens.model.parallel import world\nworld()"
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29577",
           parallel.OPT_IN_VARIABLE: "1", parallel.TIMEOUT_VARIABLE: "3"}
    env.pop(parallel.LAUNCHER_VARIABLE, None)
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and time.perf_counter() - t0 < 60
    assert "ModelError: the process group did not form (WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1" in run.stderr
    assert f"{parallel.TIMEOUT_VARIABLE} sets the wait (3 s)" in run.stderr
