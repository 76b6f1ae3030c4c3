"""The demo pipeline at full size on one GPU: stage times and peak GPU memory, written to
figures/bench.json → ``"gpu"``. Never part of ``make test``; run it where a GPU is
(``python benchmarks/gpu_check.py``; on this project's lent machines through the device
tool, see its README).

``"gpu_long_context"`` (:func:`long_context_check`): a randomly initialised model of
Llama-3.2-3B's configuration (no weights to download) in bfloat16 at 8k, 32k and 64k
tokens: the plain Hugging Face SDPA forward, then on the bridge's pattern-free path a
forward, the span masses of every head at the last 16 rows (the scoring hooks), split-softmax
(τ = 0.1, 20 heads, every row) and focus directions (α = 1, 20 heads); and the eager path,
recorded as out of memory where it does not fit. Median time of 3 calls and peak GPU memory
above the weights, per case. ``make test`` runs the same code on a tiny config on the CPU.

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


LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})


def _timed(fn, device: str, repeats: int) -> dict:
    """Median seconds of ``repeats`` calls and the peak memory above the start (CUDA), or
    ``{"error": "out of memory"}``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    try:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    peak = (torch.cuda.max_memory_allocated() - start) / 2**30 if device.startswith("cuda") else None
    return {"seconds": sorted(times)[len(times) // 2], "peak_gib_above_weights": peak}


def _cases(model, tokens, heads) -> dict:
    """The cases of :func:`long_context_check` as zero-argument callables."""
    from types import SimpleNamespace

    import focuslens as fl
    from focuslens.data.render import Span
    from focuslens.measure.record import Recording
    from focuslens.model.attention import eager_attention
    from focuslens.model.hooks import last_position_only

    T = tokens.shape[1]
    prompt = SimpleNamespace(answer=Span(T - 16, T), n_tokens=T)
    gold = Span(T // 3, T // 3 + min(256, T // 4))  # a document-sized span in the middle
    c = model.cfg
    g = torch.Generator().manual_seed(0)
    dirs = fl.FocusDirections(torch.randn(c.n_layers, c.n_heads, c.d_head, generator=g), torch.zeros(c.n_layers, c.n_heads, c.d_head),
                              heads, {"model": fl.model.model_id(model)})
    last = [last_position_only()]

    def run(hooks):
        return lambda: model.run_with_hooks(tokens, fwd_hooks=hooks + last)

    def eager(fn):
        def go():
            with eager_attention(model):
                fn()
        return go

    scoring = lambda: run(Recording(model, "all", {"gold": gold}, prompt=prompt).hooks())()  # noqa: E731
    return {"bridge": run([]), "span_masses": scoring,
            "split_softmax": run(fl.SplitSoftmax(heads, span=gold, tau=0.1).hooks(model)),
            "focus": run(fl.Focus(dirs, alpha=1.0, heads=heads).hooks(model)),
            "eager_forward": eager(run([])), "eager_span_masses": eager(scoring)}


@torch.no_grad()
def long_context_check(lengths=(8192, 32768, 65536), *, device: str = "cuda", dtype=torch.bfloat16,
                       config: dict | None = None, repeats: int = 3) -> dict:
    """The ``"gpu_long_context"`` entry (module docstring)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from focuslens.model.load import load_model
    from focuslens.model.testing import tiny_tokenizer

    cfg = LlamaConfig(**(config or LLAMA_3B))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {T: torch.randint(0, cfg.vocab_size, (1, T), generator=g).to(device) for T in lengths}
    out: dict = {"config": "Llama-3.2-3B (random init)" if config is None else cfg.to_dict(), "dtype": str(dtype),
                 "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device}
    for T in lengths:  # the plain model first: the bridge changes the HF model it wraps
        out[str(T)] = {"hf_sdpa": _timed(lambda: hf(inputs[T], logits_to_keep=1), device, repeats)}
    model = load_model(hf, tokenizer=tiny_tokenizer(), device=device, dtype=dtype)
    heads = [(layer, head) for layer in range(0, model.cfg.n_layers, max(1, model.cfg.n_layers // 10))
             for head in (0, 1)][:20]
    for T in lengths:
        for name, fn in _cases(model, inputs[T], heads).items():
            out[str(T)][name] = _timed(fn, device, repeats)
        ref = out[str(T)]["hf_sdpa"].get("seconds")
        for r in out[str(T)].values():
            if ref and "seconds" in r:
                r["time_ratio"] = r["seconds"] / ref
        print(json.dumps({T: out[str(T)]}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["quick", "full"], default="full")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype on the GPU")
    ap.add_argument("--out", default=str(ROOT / "figures" / "bench.json"))
    ap.add_argument("--release", default=str(ROOT.parent / "shared" / "data" / "focus-direction-release"))
    ap.add_argument("--only", choices=["demo", "long-context"], help="run one of the two checks (default: both)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (this check needs one; make test never runs it).")
    sys.path.insert(0, str(ROOT))
    from focuslens.io import read_json, write_json

    out = Path(args.out)
    if args.only in (None, "long-context"):  # first: its 64k case is what no CPU can run
        result = long_context_check()
        bench = read_json(out, "figures/bench.json") if out.exists() else {}
        write_json(out, bench | {"gpu_long_context": result}, indent=2)
    if args.only == "long-context":
        return
    from focuslens.experiments.pipeline import DemoSettings, run_demo
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
    bench = read_json(out, "figures/bench.json") if out.exists() else {}
    write_json(out, bench | {"gpu": result}, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
