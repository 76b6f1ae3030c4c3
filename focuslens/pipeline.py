"""The end-to-end pipeline behind ``make demo`` / ``focuslens demo``.

Each stage prints its table, writes its figures under ``out_dir`` and adds its section
to ``out_dir/summary.json`` (machine-readable: every number that is printed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["run_demo", "run_distraction", "run_contextual_heads", "update_summary"]


def update_summary(path: str | Path, section: str, data: dict) -> dict:
    """Merge ``{section: data}`` into the JSON file at ``path`` (created if missing)."""
    path = Path(path)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[section] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _print_distraction(summary: dict) -> None:
    acc, cand = summary["accuracy"], summary["candidate_accuracy"]
    print(f"\nDistraction table ({summary['n_prompts']} prompts per row, gold at random positions)")
    print(f"{'documents':>10} {'top-1 acc':>10} {'candidate acc':>14}")
    for n in acc:
        print(f"{n:>10} {acc[n]:>10.3f} {cand[n]:>14.3f}")
    key = next(k for k in summary if k.startswith("by_gold_position_"))
    print(f"\nBy gold position ({key.rsplit('_', 1)[1]} documents)")
    for pos, a in summary[key].items():
        print(f"{pos:>10} {a:>10.3f}")


def run_distraction(
    model,
    *,
    n_prompts: int = 100,
    n_documents=(1, 5, 10, 20),
    seed: int = 0,
    out_dir: str | Path = "figures",
    quiet: bool = False,
) -> dict:
    """Distraction on the synthetic task: table, figure and ``summary.json`` section."""
    from focuslens.data import make_synthetic_qa
    from focuslens.eval import distraction, distraction_summary
    from focuslens.models import model_id
    from focuslens.viz import plot_distraction, save_figure

    examples = make_synthetic_qa(n_prompts, n_documents=max(n_documents), seed=seed)
    rows = distraction(model, examples, n_documents=n_documents, seed=seed, quiet=quiet)
    summary = distraction_summary(rows) | {"model": model_id(model), "task": "synthetic", "seed": seed}
    _print_distraction(summary)
    out = Path(out_dir)
    rows.to_csv(out / "distraction.csv", index=False) if out.mkdir(parents=True, exist_ok=True) is None else None
    fig = plot_distraction(rows, title=f"Distraction on {model_id(model)}: synthetic multi-document QA")
    written = save_figure(fig, out / "distraction")
    print("wrote", ", ".join(str(p) for p in written))
    update_summary(out / "summary.json", "distraction", summary)
    return summary


def run_contextual_heads(
    model,
    *,
    n_prompts: int = 100,
    n_documents: int = 20,
    seed: int = 1,
    out_dir: str | Path = "figures",
    quiet: bool = False,
):
    """Score every head on synthetic training prompts; print the top 20, draw the map."""
    from focuslens.data import make_synthetic_qa
    from focuslens.scoring import score_heads
    from focuslens.viz import plot_head_map, save_figure

    examples = make_synthetic_qa(n_prompts, n_documents=n_documents, seed=seed)
    scores = score_heads(model, examples, quiet=quiet, data=f"synthetic n_documents={n_documents} seed={seed}")
    out = Path(out_dir)
    scores.save(out / "contextual_heads.json")
    top = scores.top_k(20)
    print(f"\nContextual heads: attention mass from the answer rows to the gold document "
          f"({n_prompts} prompts, {n_documents} documents; 95% bootstrap CI)")
    print(f"{'rank':>4} {'layer':>5} {'head':>4} {'score':>7} {'95% CI':>17} {'irrelevant max':>15} {'sink':>6}")
    for rank, (layer, head) in enumerate(top, 1):
        print(f"{rank:>4} {layer:>5} {head:>4} {float(scores['gold'][layer, head]):>7.3f} "
              f"[{float(scores.ci_low['gold'][layer, head]):.3f}, {float(scores.ci_high['gold'][layer, head]):.3f}] "
              f"{float(scores['irrelevant_max'][layer, head]):>15.3f} {float(scores['sink'][layer, head]):>6.3f}")
    frac = {t: scores.fraction_above(t) for t in (0.1, 0.2)}
    print(f"fraction of heads above 0.1: {frac[0.1]:.4f}, above 0.2: {frac[0.2]:.4f}")
    written = save_figure(plot_head_map(scores), out / "contextual_heads", width=800, height=900)
    print("wrote", ", ".join(str(p) for p in written))
    update_summary(
        out / "summary.json",
        "contextual_heads",
        {
            "top": [[layer, head, round(float(scores["gold"][layer, head]), 4)] for layer, head in top],
            "frac_above_0.1": frac[0.1],
            "frac_above_0.2": frac[0.2],
            "n_prompts": n_prompts,
            "n_documents": n_documents,
            "setting": scores.metadata["setting"],
            "answer_rows": scores.metadata["answer_rows"],
            "accuracy_of_scored_prompts": scores.metadata["accuracy"],
        },
    )
    return scores


def run_demo(
    model_spec: str = "smollm2-135m-instruct",
    *,
    n_prompts: int = 100,
    seed: int = 0,
    out_dir: str | Path = "figures",
    quiet: bool = False,
) -> dict:
    """Load the model and run every stage of the pipeline; returns the summary."""
    from focuslens.models import load_model

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = load_model(model_spec)
    print(f"loaded {model_spec}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads "
          f"({model.cfg.n_key_value_heads or model.cfg.n_heads} KV heads) in {time.perf_counter() - t0:.1f}s")
    run_distraction(model, n_prompts=n_prompts, seed=seed, out_dir=out_dir, quiet=quiet)
    run_contextual_heads(model, n_prompts=n_prompts, seed=seed + 1, out_dir=out_dir, quiet=quiet)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; summary in {Path(out_dir) / 'summary.json'}")
    return json.loads((Path(out_dir) / "summary.json").read_text())
