"""`make bench`: speed and memory of focuslens' hot paths, measured side by side.

Every ratio compares methods on the same prompts in the same run, so machine noise
affects both sides. Results are printed and written to figures/bench.json.

Scoring:
* time: ``score_heads`` (reduction inside ``hook_pattern`` hooks) vs a plain forward
  over the same prompts (same code path without the hooks), and vs the naive way
  (``run_with_cache`` of every attention pattern, then reduce), on the same prompts;
* peak memory at ~2k tokens: each method in fresh processes (median of 3); the peak
  resident-set growth during the call (VmHWM reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _naive_scores(model, prompts):
    """What the official code does: keep every attention pattern, then reduce."""
    from focuslens.scoring import span_masses

    out = []
    for p in prompts:
        _, cache = model.run_with_cache(p.input_ids[None], names_filter=lambda n: n.endswith("hook_pattern"))
        out.append(
            torch.stack(
                [
                    span_masses(cache[f"blocks.{l}.attn.hook_pattern"][0][:, p.answer.to_slice()], p)
                    for l in range(model.cfg.n_layers)
                ]
            )
        )
        del cache
    return out


def _long_prompt(model, target_tokens: int):
    """A ~target-token prompt: NQ documents from ../shared if present, else synthetic."""
    from focuslens.data import make_synthetic_qa, render

    shared = ROOT.parent / "shared" / "data" / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"
    if shared.exists():
        from focuslens.data import make_nq_distractor_examples

        for n in range(2, 60):
            ex = make_nq_distractor_examples(shared, n_documents=n, gold_positions=(n // 2,), limit=1)[0]
            p = render(ex, model.tokenizer)
            if p.n_tokens >= target_tokens:
                return p
    ex = make_synthetic_qa(1, n_documents=69, seed=0)[0]
    return render(ex, model.tokenizer)


def _memory_child(method: str, target_tokens: int) -> None:
    """Run one method once in this (fresh) process; print peak RSS growth in MiB."""
    from focuslens.eval import next_token_logits
    from focuslens.models import load_model
    from focuslens.scoring import score_heads

    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m-instruct")
    prompt = _long_prompt(model, target_tokens)
    next_token_logits(model, [prompt], quiet=True)  # warm-up: allocator, kernels

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    base = rss("VmRSS:")
    if method == "forward":
        next_token_logits(model, [prompt], quiet=True)
    elif method == "scoring":
        score_heads(model, [prompt], n_bootstrap=0, quiet=True)
    elif method == "naive":
        _naive_scores(model, [prompt])
    print(json.dumps({"peak_mib": (rss("VmHWM:") - base) / 2**20, "seq_len": prompt.n_tokens}))


def _peak(method: str, target_tokens: int, repeats: int = 3) -> dict:
    """Median over ``repeats`` fresh processes (single runs vary by ~±50 MiB here)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", method, "--tokens", str(target_tokens)],
            capture_output=True, text=True, check=True,
            # large blocks straight from mmap and back on free: RSS then tracks live tensors
            # instead of glibc's heap high-water mark, which varies run to run
            env=os.environ | {"TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["peak_mib"])
    return runs[len(runs) // 2] | {"all_mib": [r["peak_mib"] for r in runs]}


def bench_scoring(n_prompts: int, target_tokens: int) -> dict:
    from focuslens.data import make_synthetic_qa, render
    from focuslens.eval import next_token_logits
    from focuslens.models import load_model
    from focuslens.scoring import score_heads

    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m-instruct")
    prompts = [render(ex, model.tokenizer) for ex in make_synthetic_qa(n_prompts, n_documents=20, seed=0)]
    next_token_logits(model, prompts[:2], quiet=True)  # warm-up

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    # interleave the methods so drifting machine load hits them alike
    t = {"forward": 0.0, "scoring": 0.0, "naive": 0.0}
    chunk = max(1, n_prompts // 5)
    for i in range(0, n_prompts, chunk):
        batch = prompts[i : i + chunk]
        t["forward"] += timed(lambda: next_token_logits(model, batch, quiet=True))
        t["scoring"] += timed(lambda: score_heads(model, batch, n_bootstrap=0, quiet=True))
        t["naive"] += timed(lambda: _naive_scores(model, batch))
    order = ("forward", "scoring", "naive")
    mem = {m: _peak(m, target_tokens) for m in order}
    result = {
        "n_prompts": n_prompts,
        "mean_prompt_tokens": sum(p.n_tokens for p in prompts) / n_prompts,
        "seconds": t,
        "time_ratio_vs_forward": t["scoring"] / t["forward"],
        "naive_time_ratio_vs_forward": t["naive"] / t["forward"],
        "peak_mib": {m: v["peak_mib"] for m, v in mem.items()},
        "mem_ratio_vs_forward": mem["scoring"]["peak_mib"] / mem["forward"]["peak_mib"],
        "naive_mem_ratio_vs_forward": mem["naive"]["peak_mib"] / mem["forward"]["peak_mib"],
        "seq_len": mem["forward"]["seq_len"],
    }
    print(f"\nscoring vs plain forward ({n_prompts} prompts, ~{result['mean_prompt_tokens']:.0f} tokens):")
    print(f"  time   forward {t['forward']:.1f}s  scoring {t['scoring']:.1f}s  naive {t['naive']:.1f}s"
          f"  -> scoring/forward {result['time_ratio_vs_forward']:.3f}x (goal <= 1.15x),"
          f" naive/forward {result['naive_time_ratio_vs_forward']:.3f}x")
    print(f"  memory at {result['seq_len']} tokens (peak growth): forward {mem['forward']['peak_mib']:.0f} MiB,"
          f" scoring {mem['scoring']['peak_mib']:.0f} MiB, naive {mem['naive']['peak_mib']:.0f} MiB"
          f"  -> scoring/forward {result['mem_ratio_vs_forward']:.3f}x (goal <= 1.2x),"
          f" naive/forward {result['naive_mem_ratio_vs_forward']:.2f}x")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-prompts", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "figures" / "bench.json"))
    ap.add_argument("--memory-child")
    args = ap.parse_args()
    if args.memory_child:
        return _memory_child(args.memory_child, args.tokens)
    out = Path(args.out)
    bench = json.loads(out.read_text()) if out.exists() else {}
    bench["scoring"] = bench_scoring(args.n_prompts, args.tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
