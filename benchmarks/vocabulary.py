"""Logits only where they are needed: a bridge forward that unembeds every position against
one that unembeds only the last (what every focuslens path does:
``focuslens.model.hooks.last_position_only``, ``stop_at_layer`` for readers), on both
embedded models. Gemma 3's 262,144-token vocabulary makes full logits 1 MiB per position in
float32 (SmolLM2's 49,152: 192 KiB).

Each case runs in fresh processes (peak-RSS growth over the loaded model, median of 3);
times are the median of 3 forwards per case, the two cases interleaved in one process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("smollm2-135m-instruct", "gemma3-270m")


def _setup(model_name: str, tokens: int):
    from focuslens.model.load import load_model

    torch.set_grad_enabled(False)
    model = load_model(model_name)
    ids = torch.randint(100, 20000, (1, tokens), generator=torch.Generator().manual_seed(0))
    return model, ids


def _run(model, ids, case: str):
    from focuslens.model.hooks import last_position_only

    hooks = [last_position_only()] if case == "last" else []
    return model.run_with_hooks(ids, fwd_hooks=hooks)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(model_name: str, case: str, tokens: int) -> None:
    """One forward of ``case`` in this fresh process: peak RSS growth in MiB."""
    model, ids = _setup(model_name, tokens)
    _run(model, ids[:, :64], case)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    base = _rss("VmRSS:")
    _run(model, ids, case)
    print(json.dumps({"peak_mib": (_rss("VmHWM:") - base) / 2**20}))


def _peak(model_name: str, case: str, tokens: int, repeats: int = 3) -> float:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", model_name, case, str(tokens)], capture_output=True,
                             text=True, check=True, env=os.environ | {"TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])
    return statistics.median(runs)


def bench_logits(tokens: int = 1024, repeats: int = 3) -> dict:
    """Per model: seconds (median) and peak-RSS growth of a full-logits and a last-position
    forward at ``tokens`` tokens, and their ratios."""
    result = {"tokens": tokens}
    for name in MODELS:
        model, ids = _setup(name, tokens)
        _run(model, ids[:, :64], "full")
        seconds = {"full": [], "last": []}
        for _ in range(repeats):  # interleaved: drifting load hits both alike
            for case in seconds:
                t = time.perf_counter()
                _run(model, ids, case)
                seconds[case].append(time.perf_counter() - t)
        del model
        med = {case: statistics.median(v) for case, v in seconds.items()}
        mib = {case: _peak(name, case, tokens) for case in ("full", "last")}
        result[name] = {"seconds": med, "peak_mib": mib, "time_ratio_full_vs_last": med["full"] / med["last"],
                        "extra_mib_full": mib["full"] - mib["last"]}
        print(f"  {name} at {tokens} tokens: full logits {med['full']:.2f}s +{mib['full']:.0f} MiB, last position "
              f"{med['last']:.2f}s +{mib['last']:.0f} MiB -> full/last {med['full'] / med['last']:.2f}x time", flush=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        print(json.dumps(bench_logits(), indent=1))
