"""`make bench`: speed and memory of focuslens' hot paths, measured side by side.

Every ratio compares methods on the same prompts in the same run, so machine noise
affects both sides. Results are printed and written to figures/bench.json.

Directions (``--only directions``):
* training time: focuslens' cached training of every head at once vs a faithful re-run of
  the paper's loop (``train_attn_only.py``: per layer, a standalone attention module on the
  cached post-norm hidden states, q/k/v/o projections, RoPE, full causal softmax over the
  whole sequence, AdamW, batch 1), same prompts, same epochs. The paper loop runs on a few
  layers and is scaled to all layers (layers are independent and cost the same);
* steering overhead: a forward pass with ``focus(...)`` hooks (top-20 heads) vs the same
  forward without hooks, interleaved prompt by prompt.

Scale (``--only scale``, benchmarks/scale.py): the disk-streamed training cache vs the
in-memory one; peak RSS at N and 10·N prompts, time per prompt.

Long context (``--only long_context``, benchmarks/long_context.py): the pattern-free
attention path at 2k, 4k and 8k tokens against a plain Hugging Face SDPA forward.

Scoring:
* time: ``score_heads`` (reduction inside ``hook_pattern`` hooks) vs the evaluation
  forward ``next_token_logits`` over the same prompts (not the same code path: it batches
  prompts and shares their common prefix, so the ratio also counts those differences), and
  vs the naive way (``run_with_cache`` of every attention pattern, then reduce);
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
    from focuslens.measure.scoring import span_masses

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
    from focuslens.measure.forward import next_token_logits
    from focuslens.measure.scoring import score_heads
    from focuslens.model.load import load_model

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
    from focuslens.measure.forward import next_token_logits
    from focuslens.measure.scoring import score_heads
    from focuslens.model.load import load_model

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


# ------------------------------------------------------------------ directions
def _paper_layer_loop(model, layer: int, hidden: list, prompts, *, epochs: int, lr: float, seed: int,
                      check_only: bool = False):
    """The official per-layer loop, re-run faithfully: seconds for ``epochs`` over ``prompts``.
    ``check_only``: the gold mass of every head on ``prompts[0]`` at initialisation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = model.blocks[layer].attn.original_component
    lin = {n: getattr(attn, n).original_component for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    H, d = model.cfg.n_heads, model.cfg.d_head
    kv = model.cfg.n_key_value_heads or H
    g = torch.Generator().manual_seed(seed)
    dq = torch.nn.Parameter(torch.randn(H, d, generator=g) * 0.01)
    dk = torch.nn.Parameter(torch.randn(H, d, generator=g) * 0.01)
    opt = torch.optim.AdamW([dq, dk], lr=lr)
    rotary = model.original_model.model.rotary_emb

    def gold_mass(i):  # the standalone attention module of the layer, full sequence
        x, p = hidden[i], prompts[i]
        T = x.shape[1]
        cos, sin = rotary(x, torch.arange(T)[None])
        q = lin["q_proj"](x).view(1, T, H, d).transpose(1, 2)
        k = lin["k_proj"](x).view(1, T, kv, d).transpose(1, 2)
        v = lin["v_proj"](x).view(1, T, kv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, H // kv), repeat_kv(v, H // kv)
        q, k = q + dq[None, :, None], k + dk[None, :, None]
        scores = (q @ k.transpose(-1, -2) * attn.scaling).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                       float("-inf"))
        w = scores.softmax(-1, dtype=torch.float32)
        out = lin["o_proj"]((w @ v).transpose(1, 2).reshape(1, T, H * d))  # the module's output, as computed there
        return w[0, :, p.answer.to_slice(), p.gold.to_slice()].sum(-1).mean(-1), out  # [head]

    if check_only:
        with torch.no_grad():
            return gold_mass(0)[0]
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in torch.randperm(len(prompts), generator=g).tolist():
            mass, out = gold_mass(i)
            loss = -mass.mean() + 0 * out.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def bench_directions(n_prompts: int, epochs: int, paper_layers: tuple[int, ...]) -> dict:
    from focuslens.data import make_synthetic_qa
    from focuslens.directions.artifact import FocusDirections
    from focuslens.directions.cache import collect_attention_inputs
    from focuslens.directions.train import _train_on_inputs
    from focuslens.measure.scoring import prepare_prompts
    from focuslens.model.load import load_model
    from focuslens.steer.focus import focus_hooks

    model = load_model("smollm2-135m-instruct")
    prompts = prepare_prompts(model, make_synthetic_qa(n_prompts, n_documents=20, seed=40), quiet=True)
    inputs = collect_attention_inputs(model, prompts, quiet=True)
    # the paper's cache: the attention input (post-norm hidden state, the input of k_proj) of the layers it trains
    hidden = {layer: [] for layer in paper_layers}
    with torch.no_grad():
        for p in prompts:
            hooks = [(f"blocks.{layer}.attn.hook_in", lambda x, hook, layer=layer: hidden[layer].append(x.clone()))
                     for layer in paper_layers]
            model.run_with_hooks(p.input_ids[None], fwd_hooks=hooks, stop_at_layer=max(paper_layers) + 1)
    settings = dict(epochs=epochs, lr=1e-3, weight_decay=0.01, batch_size=1, init_std=0.01, patience=epochs,
                    seed=0, quiet=True)
    # both loops optimise the same objective: at the same initial directions, same gold mass
    from focuslens.directions.train import span_attention

    L, H, d = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    layer0 = paper_layers[0]
    init = torch.zeros(L, H, d)
    init[layer0] = torch.randn(H, d, generator=torch.Generator().manual_seed(0)) * 0.01  # the loop's d_q at init
    theirs = _paper_layer_loop(model, layer0, hidden[layer0], prompts, epochs=1, lr=0.0, seed=0, check_only=True)
    ours_mass = span_attention(inputs.select(0), init, None)["gold"][0, layer0]
    agreement = float((theirs - ours_mass).abs().max())
    assert agreement < 1e-4, f"the two objectives disagree by {agreement}"
    t0 = time.perf_counter()
    _train_on_inputs(inputs, None, **settings)
    ours = time.perf_counter() - t0
    paper = {layer: _paper_layer_loop(model, layer, hidden[layer], prompts, epochs=epochs, lr=1e-3, seed=0)
             for layer in paper_layers}
    per_layer = sum(paper.values()) / len(paper)
    paper_all = per_layer * model.cfg.n_layers

    # steering overhead in a forward pass: same prompts, interleaved, with and without hooks
    dirs = FocusDirections(torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head), torch.zeros(
        model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head), [], {"model": model.cfg.model_name})
    heads = [(layer, head) for layer in range(10, 30) for head in (0,)]
    hooks = focus_hooks(model, dirs, 0.5, heads)
    t = {"plain": 0.0, "focus": 0.0}
    with torch.no_grad():
        model(prompts[0].input_ids[None])  # warm-up
        for p in prompts[: min(len(prompts), 60)]:
            for name, fwd in (("plain", []), ("focus", hooks)):
                s = time.perf_counter()
                model.run_with_hooks(p.input_ids[None], fwd_hooks=fwd)
                t[name] += time.perf_counter() - s
    result = {
        "n_prompts": n_prompts,
        "epochs": epochs,
        "cache_seconds": inputs.seconds,
        "train_seconds": ours,
        "objective_agreement_max_abs": agreement,
        "paper_loop_layers": list(paper_layers),
        "paper_loop_seconds_per_layer": per_layer,
        "paper_loop_seconds_all_layers": paper_all,
        "speedup_vs_paper_loop": paper_all / ours,
        "steering_forward_seconds": t,
        "steering_overhead": t["focus"] / t["plain"] - 1,
    }
    print(f"\ndirection training ({n_prompts} prompts, {epochs} epochs, batch 1; caching pass {inputs.seconds:.0f}s):")
    print(f"  focuslens, all {model.cfg.n_layers} layers at once: {ours:.1f}s")
    print(f"  paper loop: {per_layer:.1f}s per layer (timed on layers {list(paper_layers)}) -> "
          f"{paper_all:.0f}s for {model.cfg.n_layers} layers  => speedup {result['speedup_vs_paper_loop']:.1f}x (goal >= 20x)")
    print(f"  steering overhead in a forward pass (focus on 20 heads): {100 * result['steering_overhead']:+.1f}% "
          f"(goal <= 5%)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-prompts", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "figures" / "bench.json"))
    ap.add_argument("--memory-child")
    ap.add_argument("--only", choices=["scoring", "directions", "scale", "scale-training", "long_context", "logits"],
                    help="run one benchmark (default: all); scale-training: only the cache/training cases of "
                         "scale (its data-parallel and eager-attention entries are kept)")
    ap.add_argument("--scale-prompts", type=int, default=100, help="N of the scale benchmark (also run at 10·N)")
    ap.add_argument("--direction-prompts", type=int, default=200)
    ap.add_argument("--direction-epochs", type=int, default=2)
    args = ap.parse_args()
    if args.memory_child:
        return _memory_child(args.memory_child, args.tokens)
    from focuslens.io import read_summary, write_json

    out = Path(args.out)
    bench = read_summary(out)  # the other sections stay as they were
    if args.only in (None, "scoring"):
        bench["scoring"] = bench_scoring(args.n_prompts, args.tokens)
    if args.only in (None, "directions"):
        bench["directions"] = bench_directions(args.direction_prompts, args.direction_epochs, (8, 17, 26))
    if args.only in (None, "scale"):
        from scale import bench_parallel, bench_scale  # benchmarks/scale.py

        eager = {}
        for tokens in (2000, 4000, 8000):  # the bridge's eager attention: H·T² per layer (docs/scaling.md)
            eager[str(tokens)] = _peak("forward", tokens, repeats=1)
            print(f"  eager forward at {eager[str(tokens)]['seq_len']} tokens: peak +{eager[str(tokens)]['peak_mib']:.0f} MiB",
                  flush=True)
        bench["scale"] = bench_scale(args.scale_prompts) | {"data_parallel": bench_parallel(args.n_prompts),
                                                            "eager_attention_peak": eager}
    if args.only in (None, "long_context"):
        from long_context import bench_long_context  # benchmarks/long_context.py

        bench["long_context"] = bench_long_context()
    if args.only in (None, "logits"):
        from vocabulary import bench_logits  # benchmarks/vocabulary.py

        bench["logits"] = bench_logits()
    if args.only == "scale-training":
        from scale import bench_scale

        bench["scale"] = bench.get("scale", {}) | bench_scale(args.scale_prompts)
    write_json(out, bench, indent=2)  # atomic: a killed run leaves the old file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
