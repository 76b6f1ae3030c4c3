"""The demo pipeline at full size on one GPU: stage times and peak GPU memory, written to
figures/bench.json → ``"gpu"``. Never part of ``make test``; run it where a GPU is
(``python benchmarks/gpu_check.py``; on this project's lent machines through the device
tool, see its README).

On CUDA, :func:`focuslens.load_model` loads in bfloat16; the direction-training cache is
kept in float32 and its objective computed in float32/float64 as on the CPU. Compare the
summary's numbers with the CPU full-size run in figures/summary.json: bf16 forwards can move
near-tied predictions, so accuracies may differ by a few prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_result(summary: dict, *, device: str, dtype: str, size: str, load_seconds: float, peak_bytes: int) -> dict:
    """The ``"gpu"`` entry of figures/bench.json from a demo run's summary.json."""
    run = summary["demo_run"]
    return {"device": device, "dtype": dtype, "size": size, "load_seconds": round(load_seconds, 1),
            "seconds": run["seconds"], "stage_seconds": run["stage_seconds"],
            "peak_gpu_memory_gib": peak_bytes / 2**30, "prefills_per_test_prompt": run["prefills_per_test_prompt"],
            "accuracy": {"distraction": summary["distraction"]["accuracy"],
                         "focus_directions_unsteered": summary["focus_directions"]["baseline_test"],
                         "focus_directions_best": summary["focus_directions"]["best"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["quick", "full"], default="full")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype on the GPU")
    ap.add_argument("--out", default=str(ROOT / "figures" / "bench.json"))
    ap.add_argument("--release", default=str(ROOT.parent / "shared" / "data" / "focus-direction-release"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (this check needs one; make test never runs it).")
    sys.path.insert(0, str(ROOT))
    from focuslens.experiments.pipeline import DemoSettings, run_demo
    from focuslens.io import read_json, write_json
    from focuslens.model.load import load_model

    settings = DemoSettings.quick() if args.size == "quick" else DemoSettings()
    t0 = time.perf_counter()
    model = load_model("smollm2-135m-instruct", device="cuda", dtype=args.dtype)
    load_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        release = args.release if Path(args.release).is_dir() else None
        run_demo(model, settings=settings, out_dir=tmp, release_dir=release, quiet=True)
        summary = read_json(Path(tmp) / "summary.json", "the GPU run's summary")
    result = gpu_result(summary, device=torch.cuda.get_device_name(0), dtype=args.dtype, size=args.size,
                        load_seconds=load_s, peak_bytes=torch.cuda.max_memory_allocated())
    out = Path(args.out)
    bench = read_json(out, "figures/bench.json") if out.exists() else {}
    write_json(out, bench | {"gpu": result}, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
