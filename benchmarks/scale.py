"""`make bench` → ``"scale"``: the direction-training cache on disk vs in memory.

Each case runs in a fresh process (peak RSS is a per-process high-water mark) on the same
synthetic prompts (SmolLM2, 5 documents, seed 0), one after the other in one bench run:

* ``memory`` at N: :func:`collect_attention_inputs` + training in memory (today's path);
* ``streamed`` at N and at 10·N: :func:`cache_to_disk` (per-layer shards, chunks of 16)
  + training from the shards, all layers per batch (the default: memory bounded by one
  batch);
* ``streamed`` and ``memory`` at N in layer groups of 6 (``layers_per_group``: memory
  bounded by one batch of one group, for batches whose layers do not fit at once); the
  in-memory grouped case separates what grouping costs from what the disk costs.

* ``interleaved``: the training-time ratio again, in one process on the same cached
  prompts, one epoch from memory and one from disk in turn, 5 times (median): on a
  shared machine the separate processes above run minutes apart and drift by ±20 %.

Reported: peak RSS (VmHWM, the whole process: model included) and its growth over the
RSS after the model is loaded; caching and training seconds per prompt and epoch.
Targets (issue 13): peak RSS at 10·N ≤ 1.2 × at N (streamed); streamed training time
per prompt ≤ 1.3 × the in-memory trainer's.

Data parallel (:func:`bench_parallel`): SmolLM2 scoring of 100 prompts, 2 processes × 1
thread (accelerate launch, gloo) vs 1 process × 1 thread, timed between barriers after
the model is loaded; the scores must agree (target: speedup ≥ 1.7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _setup(n: int):
    """SmolLM2 and the bench's prompts: ``n`` to train on, 20 to validate on (5 documents, seed 0)."""
    from focuslens.data.synthetic import make_synthetic_qa
    from focuslens.measure.scoring import prepare_prompts
    from focuslens.model.load import load_model

    model = load_model("smollm2-135m-instruct")
    examples = make_synthetic_qa(n + 20, n_documents=5, seed=0)
    return model, prepare_prompts(model, examples[:n], quiet=True), prepare_prompts(model, examples[n:], quiet=True)


def child(case: str, n: int, epochs: int, layers_per_group: int | None) -> dict:
    """One case in this process (see the module docstring); returns its measurements."""
    from focuslens.directions.train import train_directions

    model, train, val = _setup(n)
    base = _rss("VmRSS:")
    kw = dict(epochs=epochs, patience=epochs, seed=0, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if case == "memory":
            dirs = train_directions(model, train, val, layers_per_group=layers_per_group, **kw)
        else:
            dirs = train_directions(model, train, val, cache_dir=tmp, layers_per_group=layers_per_group, **kw)
        wall = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    meta = dirs.metadata
    return {"case": case, "n_prompts": n, "epochs": epochs, "layers_per_group": layers_per_group,
            "peak_rss_mib": _rss("VmHWM:") / 2**20, "rss_growth_mib": (_rss("VmHWM:") - base) / 2**20,
            "cache_s_per_prompt": meta["cache_seconds"] / (n + len(val)),
            "train_s_per_prompt_epoch": meta["train_seconds"] / (n * meta["epochs_run"]),
            "wall_s": wall, "disk_mib": disk / 2**20, "q_norm_median": float(dirs.q.norm(dim=-1).median())}


def interleaved_child(n: int, repeats: int, groups: int) -> dict:
    """Training time from disk vs memory in one process, on the same cached prompts, one
    epoch of each in turn, ``repeats`` times (one layer group and groups of ``groups``):
    machine drift and neighbours hit both sides alike. The in-memory cache is the disk
    cache read whole (the same tensors and padding as :func:`collect_attention_inputs`)."""
    import statistics

    from focuslens.directions.streamed import cache_to_disk
    from focuslens.directions.train import train_directions

    model, train, val = _setup(n)
    out = {"n_prompts": n, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        disk = (cache_to_disk(model, train, f"{tmp}/train", quiet=True), cache_to_disk(model, val, f"{tmp}/val", quiet=True))
        memory = tuple(c.batch(range(len(c)), slice(None)) for c in disk)
        for per_group in (None, groups):
            times = {"memory": [], "streamed": []}
            for _ in range(repeats):
                for name, inputs in (("memory", memory), ("streamed", disk)):
                    dirs = train_directions(model, train, val, inputs=inputs, epochs=1, patience=1, seed=0, quiet=True,
                                            layers_per_group=per_group)
                    times[name].append(dirs.metadata["train_seconds"] / n)
            ratios = [a / b for a, b in zip(times["streamed"], times["memory"])]
            out[f"groups_of_{per_group}" if per_group else "one_group"] = {
                "train_s_per_prompt_epoch": times, "ratios": ratios, "ratio_median": statistics.median(ratios)}
    return out


def bench_scale(n: int = 100, factor: int = 10, epochs: int = 3, groups: int = 6) -> dict:
    """The five cases in fresh processes, then the ratios of the targets."""
    env = os.environ | {"TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {}
    for name, case, size, per_group in (("memory", "memory", n, 0), ("streamed", "streamed", n, 0),
                                        (f"streamed_groups_of_{groups}", "streamed", n, groups),
                                        (f"memory_groups_of_{groups}", "memory", n, groups),
                                        ("streamed_x10", "streamed", factor * n, 0)):
        cmd = [sys.executable, __file__, case, str(size), str(epochs), str(per_group)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        runs[name] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  scale {name:20s} n={size:5d}: peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['rss_growth_mib']:.0f}), "
              f"cache {r['cache_s_per_prompt']:.3f} s/prompt, train {r['train_s_per_prompt_epoch']:.4f} s/prompt/epoch",
              flush=True)
    cmd = [sys.executable, __file__, "interleaved", str(n), "5", str(groups)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    inter = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  scale interleaved in one process: streamed / memory time per prompt, median of 5: "
          f"{inter['one_group']['ratio_median']:.2f} (one group), {inter[f'groups_of_{groups}']['ratio_median']:.2f} "
          f"(groups of {groups})", flush=True)
    small, big, mem = runs["streamed"], runs["streamed_x10"], runs["memory"]
    grouped, mem_grouped = runs[f"streamed_groups_of_{groups}"], runs[f"memory_groups_of_{groups}"]
    return {"runs": runs,
            "peak_rss_ratio": big["peak_rss_mib"] / small["peak_rss_mib"], "peak_rss_target": 1.2,
            "rss_growth_ratio": big["rss_growth_mib"] / max(small["rss_growth_mib"], 1.0),
            "train_time_ratio": small["train_s_per_prompt_epoch"] / mem["train_s_per_prompt_epoch"],
            "train_time_ratio_groups": grouped["train_s_per_prompt_epoch"] / mem["train_s_per_prompt_epoch"],
            # the same grouping on both sides: what the disk costs when training walks groups
            "train_time_ratio_groups_vs_memory_groups": (grouped["train_s_per_prompt_epoch"]
                                                         / mem_grouped["train_s_per_prompt_epoch"]),
            "train_time_target": 1.3,
            # the same ratio measured in one process, epochs alternating (robust to drift)
            "train_time_interleaved": inter,
            "train_time_ratio_interleaved": inter["one_group"]["ratio_median"],
            "train_time_ratio_interleaved_groups": inter[f"groups_of_{groups}"]["ratio_median"],
            "cache_time_ratio": small["cache_s_per_prompt"] / mem["cache_s_per_prompt"],
            "memory_growth_vs_streamed_at_n": mem["rss_growth_mib"] / max(small["rss_growth_mib"], 1.0)}


def dp_child(n: int, out: str) -> None:
    """One process of the data-parallel case: score ``n`` prompts (10 documents), 1 thread,
    timed between barriers after the model is loaded; rank 0 saves the time and the scores."""
    import torch

    from focuslens.data.synthetic import make_synthetic_qa
    from focuslens.measure.scoring import score_heads
    from focuslens.model import parallel
    from focuslens.model.load import load_model

    torch.set_num_threads(1)
    model = load_model("smollm2-135m-instruct")
    examples = make_synthetic_qa(n, n_documents=10, seed=1)
    rank, size = parallel.world()
    sync = torch.distributed.barrier if size > 1 else (lambda: None)
    sync()
    t0 = time.perf_counter()
    scores = score_heads(model, examples, n_bootstrap=0, quiet=True)
    sync()
    if rank == 0:
        torch.save(scores.mean, f"{out}.pt")
        Path(f"{out}.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "processes": size}))


def bench_parallel(n: int = 100) -> dict:
    """Scoring ``n`` prompts on SmolLM2: 2 processes × 1 thread (accelerate launch) vs 1 × 1."""
    import torch

    env = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    from focuslens.model.parallel import launch_command

    launch = launch_command(2)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, cmd in (("one", [sys.executable]), ("two", launch)):
            subprocess.run([*cmd, __file__, "dp", str(n), f"{tmp}/{name}"], check=True, env=env, capture_output=True)
            runs[name] = json.loads(Path(f"{tmp}/{name}.json").read_text())
        a, b = torch.load(f"{tmp}/one.pt"), torch.load(f"{tmp}/two.pt")
        diff = max(float((a[m] - b[m]).abs().max()) for m in a)
    speedup = runs["one"]["seconds"] / runs["two"]["seconds"]
    print(f"  data parallel scoring of {n} prompts: 1 process {runs['one']['seconds']:.1f} s, 2 processes "
          f"{runs['two']['seconds']:.1f} s, speedup {speedup:.2f} (target 1.7), max |Δ| {diff:.1e}", flush=True)
    return {"n_prompts": n, "n_documents": 10, "seconds_1_process": runs["one"]["seconds"],
            "seconds_2_processes": runs["two"]["seconds"], "speedup": speedup, "speedup_target": 1.7,
            "max_abs_difference": diff}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1] == "dp":
        dp_child(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "interleaved":
        print(json.dumps(interleaved_child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    else:
        print(json.dumps(child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) or None)))
