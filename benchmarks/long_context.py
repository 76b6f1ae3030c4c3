"""`make bench` → ``"long_context"``: the pattern-free attention path at 2k, 4k and 8k tokens.

SmolLM2-135M-Instruct (float32, CPU), one NQ prompt per length (the gold passage among
BM25 distractors from ../shared, as many documents as reach the length; synthetic documents
when the file is absent). Cases, each against the same prompt:

* ``hf_sdpa``: the plain Hugging Face model with SDPA attention (a fresh copy of the same
  weights, not wrapped by the bridge), ``logits_to_keep=1`` — the reference;
* ``bridge``: the bridge forward on focuslens' default path (:mod:`focuslens.model.attention`),
  last position unembedded;
* ``score_heads``: every head's span masses at the answer rows;
* ``split_softmax``: split-softmax (τ = 0.1) on 20 heads at every row (the paper's setting),
  through the evaluation forward ``next_token_logits``;
* ``focus``: focus directions (α = 1) on the same 20 heads at every row, likewise;
* ``eager_forward`` / ``eager_score_heads``: the same forward and scoring inside
  ``eager_attention`` (the bridge's T×T path), for comparison.

Each (case, length) runs in a fresh process: load, one warm-up call, then the peak
resident-set growth of one call (VmHWM reset through /proc/self/clear_refs; large blocks
returned to the OS at free, so RSS tracks live tensors), then the median time of
``repeats`` calls. Ratios are against ``hf_sdpa`` at the same length, in the same run.
Targets (issue 24), at 8k: ``score_heads``, ``split_softmax`` and ``focus`` ≤ 1.3× the time
and ≤ 1.2× the peak growth of ``hf_sdpa``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ("hf_sdpa", "bridge", "score_heads", "split_softmax", "focus", "eager_forward", "eager_score_heads")
HEADS = 20


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _case(case: str, model, prompt):
    """A zero-argument callable running ``case`` once on ``prompt``."""
    import focuslens as fl
    from focuslens.measure.forward import next_token_logits
    from focuslens.model.attention import eager_attention
    from focuslens.model.hooks import last_position_only

    heads = [(layer, head) for layer, head in _heads(model)]
    if case == "hf_sdpa":
        hf = _plain_hf()
        return lambda: hf(prompt.input_ids[None], logits_to_keep=1)
    if case in ("bridge", "eager_forward"):  # the bridge forward, last position unembedded (as logits_to_keep=1)
        run = lambda: model.run_with_hooks(prompt.input_ids[None], fwd_hooks=[last_position_only()])  # noqa: E731
    elif case in ("score_heads", "eager_score_heads"):
        run = lambda: fl.score_heads(model, [prompt], n_bootstrap=0, quiet=True)  # noqa: E731
    elif case == "split_softmax":
        iv = fl.SplitSoftmax(heads, tau=0.1)
        run = lambda: next_token_logits(model, [prompt], hooks=iv.hooks(model, prompt), quiet=True)  # noqa: E731
    elif case == "focus":
        g = torch.Generator().manual_seed(0)
        c = model.cfg
        dirs = fl.FocusDirections(torch.randn(c.n_layers, c.n_heads, c.d_head, generator=g) * 2,
                                  torch.zeros(c.n_layers, c.n_heads, c.d_head), heads,
                                  {"model": fl.model.model_id(model)})
        iv = fl.Focus(dirs, alpha=1.0, heads=HEADS)
        run = lambda: next_token_logits(model, [prompt], hooks=iv.hooks(model, prompt), quiet=True)  # noqa: E731
    else:
        raise SystemExit(f"unknown case {case!r}")
    if case.startswith("eager"):
        def eager():
            with eager_attention(model):
                return run()
        return eager
    return run


def _heads(model) -> list[tuple[int, int]]:
    """20 heads spread as the contextual heads of figures/summary.json are (its top 20 when
    present, else a seeded draw)."""
    summary = ROOT / "figures" / "summary.json"
    if summary.exists():
        top = json.loads(summary.read_text()).get("contextual_heads", {}).get("top")
        if top and len(top) >= HEADS:
            return [tuple(h[:2]) for h in top[:HEADS]]
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(model.cfg.n_layers * model.cfg.n_heads, generator=g)[:HEADS]
    return [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in flat]


def _plain_hf():
    from transformers import AutoModelForCausalLM

    from focuslens.model.load import _dequantized_dir

    return AutoModelForCausalLM.from_pretrained(_dequantized_dir("smollm2-135m-instruct"), attn_implementation="sdpa",
                                                dtype=torch.float32).eval()


def child(case: str, tokens: int, repeats: int) -> dict:
    """One case at one length in this fresh process (module docstring)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import _long_prompt

    from focuslens.model.load import load_model

    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m-instruct")
    prompt = _long_prompt(model, tokens)
    run = _case(case, model, prompt)
    run()  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    base = _rss("VmRSS:")
    run()
    peak = (_rss("VmHWM:") - base) / 2**20
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"seq_len": prompt.n_tokens, "peak_mib": peak, "seconds": sorted(times)[len(times) // 2], "all_seconds": times}


def bench_long_context(lengths=(2000, 4000, 8000), repeats: int = 3, cases=CASES) -> dict:
    out: dict = {"model": "smollm2-135m-instruct", "dtype": "float32", "repeats": repeats, "threads": torch.get_num_threads()}
    for tokens in lengths:
        row = {}
        for case in cases:
            proc = subprocess.run([sys.executable, __file__, "--child", case, "--tokens", str(tokens),
                                   "--repeats", str(repeats)], capture_output=True, text=True, check=True,
                                  env=os.environ | {"TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
            row[case] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {row[case]['seq_len']} tokens  {case:18s} {row[case]['seconds']:7.2f} s  "
                  f"peak +{row[case]['peak_mib']:6.0f} MiB", flush=True)
        ref = row["hf_sdpa"]
        for r in row.values():
            r["time_ratio"] = r["seconds"] / ref["seconds"]
            r["memory_ratio"] = r["peak_mib"] / ref["peak_mib"]
        out[str(tokens)] = row
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.repeats)))
        return
    print(json.dumps(bench_long_context(repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
