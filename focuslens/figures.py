"""The figures in ``figures/``: each drawn from the results the pipeline saved there.

The demo's stages save their results (CSV, JSON, safetensors) and call these functions, and
``make figures`` (``focuslens figures``) calls them again, so a figure can be restyled and
redrawn without re-running its experiment. :data:`FIGURES` lists every figure with a line
on what it shows; ``figures/README.md`` is written from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

__all__ = [
    "FIGURES",
    "draw_distraction",
    "draw_contextual_heads",
    "draw_patching",
    "draw_split_softmax",
    "draw_focus_directions",
    "draw_prompt_views",
    "draw_cross_family",
    "draw_topk_overlap",
    "draw_all",
    "write_readme",
]

#: figure stem -> what it shows (one line, for figures/README.md).
FIGURES: dict[str, str] = {
    "distraction": "accuracy vs number of documents (gold at a random position), and by gold position at 20 documents",
    "contextual_heads": "head-location map (layers × heads): attention mass from the answer rows to the gold document",
    "patching_agreement": "contextual score vs causal effect (attribution patching) for every head",
    "split_softmax": "paper Fig. 3: accuracy vs number of heads boosted by split-softmax, contextual vs random heads, "
    "one line per τ, with gold-only / unsteered / no-gold references",
    "focus_directions": "paper Fig. 4: held-out accuracy and gold attention mass vs α for the top-k heads, 20 documents",
    "focus_directions_5_documents": "the same focus-direction sweep with 5 documents",
    "document_attention": "one held-out 20-document prompt: attention mass from the answer rows of the top-20 "
    "contextual heads onto the sink, instruction, each document and the question (gold starred)",
    "token_view": "the same prompt token by token (circuitsvis, offline HTML): attention from the answer rows of "
    "the top contextual heads over the gold document and its neighbours",
    "key_bias": "what the trained focus direction favours on that prompt: the logit bias α·d_q·k_j/√d on each "
    "key for the top-10 heads, and its mean per document",
    "head_locations": "contextual heads of SmolLM2-135M (our scores) and Llama-3.2-3B / Qwen2.5-7B (the paper's "
    "released rankings) on one relative-depth axis",
    "direction_norms": "per-layer norms of the query and key focus directions vs relative depth: ours (SmolLM2) "
    "and the released ones; query norms far above key norms",
    "norm_vs_rank": "‖d_q‖ of every head vs its contextual rank, per model (Spearman in the legend)",
    "direction_similarity_smollm2": "cosine similarity between the query directions of SmolLM2's top-20 heads",
    "direction_similarity_llama": "the same for Llama-3.2-3B's released directions",
    "direction_similarity_qwen": "the same for Qwen2.5-7B's released directions",
    "topk_overlap": "top-20 overlap between SmolLM2 head rankings: scoring settings and the causal ranking",
    "focus_conditions": "`focuslens experiment focus` (`make focus-conditions`): gain of focus directions over the "
    "unsteered model with paired-bootstrap 95% CIs per task × layout × head ranking × rows, (k, α) chosen on "
    "validation, the −α control; and where the steered heads' attention lands (gold title / answer token, "
    "irrelevant documents, sink)",
}

#: scoring settings compared in ``topk_overlap`` (file suffix -> score_heads arguments).
SCORING_SETTINGS = {
    "gold_only": {"setting": "gold_only", "answer_rows": "prefix"},
    "greedy": {"setting": "documents", "answer_rows": "greedy"},
}


def _summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _need(path: Path) -> Path:
    if not path.exists():
        from focuslens.errors import DataError

        raise DataError(f"{path} is missing: run `make demo` (or the stage that writes it) first.")
    return path


def _save(fig, out: Path, stem: str, **size) -> list[Path]:
    """``fig.save``: the figure's own layout size unless ``width``/``height`` are given."""
    written = fig.save(out / stem, **size)
    print("wrote", ", ".join(str(p) for p in written))
    return written


def draw_distraction(out: str | Path) -> list[Path]:
    from focuslens.viz import plot_distraction

    out = Path(out)
    rows = pd.read_csv(_need(out / "distraction.csv"))
    model = _summary(out).get("distraction", {}).get("model", "the model")
    fig = plot_distraction(rows, title=f"Distraction on {model}: synthetic multi-document QA")
    return _save(fig, out, "distraction")


def draw_contextual_heads(out: str | Path) -> list[Path]:
    from focuslens.scoring import HeadScores
    from focuslens.viz import plot_head_map

    out = Path(out)
    scores = HeadScores.load(_need(out / "contextual_heads.json"))
    return _save(plot_head_map(scores), out, "contextual_heads", width=800, height=900)


def draw_patching(out: str | Path) -> list[Path]:
    from focuslens.patching import PatchingResult
    from focuslens.scoring import HeadScores
    from focuslens.viz import plot_rank_agreement

    out = Path(out)
    scores = HeadScores.load(_need(out / "contextual_heads.json"))
    result = PatchingResult.load(_need(out / "patching.json"))
    spearman = _summary(out).get("patching", {}).get("spearman", float("nan"))
    fig = plot_rank_agreement(
        scores["gold"], result.scores["attribution"],
        x_label="contextual score (attention mass on the gold document)",
        y_label="causal effect (attribution patching, 0 = corrupted, 1 = clean)",
        title=f"Contextual score vs causal effect per head ({result.metadata.get('model')})<br>"
        f"<sup>Spearman {spearman:+.2f} over all heads; red: top 10 contextual heads</sup>",
        highlight=scores.top_k(10),
    )
    return _save(fig, out, "patching_agreement")


def draw_split_softmax(out: str | Path) -> list[Path]:
    from focuslens.viz import plot_split_softmax_sweep

    out = Path(out)
    sweep = pd.read_csv(_need(out / "split_softmax_sweep.csv"))
    s = _summary(out).get("split_softmax", {})
    refs = {k: s[k] for k in ("gold_only", "baseline", "no_gold") if k in s}
    model = _summary(out).get("distraction", {}).get("model", "the model")
    n_docs = int(sweep.n_documents.iloc[0])
    fig = plot_split_softmax_sweep(
        sweep, references=refs,
        title=f"Split-softmax on {model}: contextual vs random heads<br><sup>{sweep.example.nunique()} held-out "
        f"{n_docs}-document prompts; random: mean ± s.d. over {sweep[sweep.group == 'random'].draw.nunique()} draws; "
        "smaller τ = stronger boost of the gold document</sup>",
    )
    return _save(fig, out, "split_softmax", width=900, height=560)


def draw_focus_directions(out: str | Path, section: str = "focus_directions") -> list[Path]:
    from focuslens.viz import plot_focus_sweep

    out = Path(out)
    test = pd.read_csv(_need(out / f"{section}_test.csv"))
    s = _summary(out).get(section, {})
    refs = {k: s[f"{k}_test"] for k in ("gold_only", "baseline", "no_gold") if f"{k}_test" in s}
    model = _summary(out).get("distraction", {}).get("model", "the model")
    chosen = {"k": s["best"]["k"], "alpha": s["best"]["alpha"]} if "best" in s else None
    fig = plot_focus_sweep(
        test, references=refs, chosen=chosen,
        title=f"Focus directions on {model}: held-out accuracy vs α<br><sup>{test.example.nunique()} prompts, "
        f"{int(test.n_documents.iloc[0])} documents; α·d_q on the top-k contextual heads at the answer rows, no "
        "label of the relevant document; circle: (k, α) chosen on validation</sup>",
    )
    return _save(fig, out, section, width=1100, height=520)


# ------------------------------------------------------------------ one prompt
def example_prompt():
    """The held-out prompt the per-prompt views show: the demo's first test question
    (:func:`focuslens.pipeline.steering_splits`, seed 4) with the gold in the middle."""
    from focuslens.data import make_synthetic_qa

    return make_synthetic_qa(1, n_documents=20, seed=6)[0].with_gold_at(9)


def draw_prompt_views(out: str | Path, model) -> list[Path]:
    """Document × head map, token view and key-bias view of :func:`example_prompt`."""
    from focuslens.data import render
    from focuslens.directions import FocusDirections
    from focuslens.scoring import HeadScores
    from focuslens.viz import plot_document_attention, plot_key_bias, token_view

    out = Path(out)
    scores = HeadScores.load(_need(out / "contextual_heads.json"), model=model)
    prompt = render(example_prompt(), model.tokenizer)
    written = _save(plot_document_attention(model, prompt, scores.top_k(20)), out, "document_attention")
    view = token_view(model, prompt, scores.top_k(5))
    written.append(view.save(out / "token_view.html"))
    print("wrote", written[-1])
    dirs_path = out / "focus_directions"
    if (dirs_path / "focus_directions.json").exists():
        dirs = FocusDirections.load(dirs_path, model=model)
        alpha = _summary(out).get("focus_directions", {}).get("best", {}).get("alpha", 1.0)
        written += _save(plot_key_bias(model, dirs, prompt, alpha=alpha, heads=10), out, "key_bias")
    return written


# ------------------------------------------------------------------ across models
def _release_models(release_dir: Path) -> dict:
    """Released directions (with their rankings) by short display name."""
    from focuslens.directions import import_release

    out = {}
    for path in sorted((p for p in Path(release_dir).iterdir() if p.is_dir()), key=lambda p: p.name.lower()):
        dirs = import_release(path)
        out[dirs.model.split("/")[-1]] = dirs
    return out


def _short(name: str) -> str:
    lowered = name.lower()
    return next((k for k in ("smollm2", "llama", "qwen", "mistral") if k in lowered), lowered.split("-")[0])


def draw_cross_family(out: str | Path, release_dir: str | Path | None) -> list[Path]:
    """Head locations and direction comparisons: our SmolLM2 results (from ``out``) next to
    the paper's released artifacts under ``release_dir`` (any models found there)."""
    from focuslens.directions import FocusDirections
    from focuslens.scoring import HeadScores
    from focuslens.viz import (
        plot_direction_norms,
        plot_direction_similarity,
        plot_head_locations,
        plot_norm_vs_rank,
    )

    out = Path(out)
    scores = HeadScores.load(_need(out / "contextual_heads.json"))
    ours = scores.metadata.get("model", "ours")
    released = _release_models(Path(release_dir)) if release_dir and Path(release_dir).is_dir() else {}
    if not released:
        print(f"no released artifacts under {release_dir!r}: cross-family figures show {ours} only")
    written = _save(plot_head_locations({ours: scores, **released}, top_k=20), out, "head_locations")
    directions = {}
    if (out / "focus_directions" / "focus_directions.json").exists():
        directions[ours] = FocusDirections.load(out / "focus_directions")
    directions.update(released)
    if directions:
        written += _save(plot_direction_norms(directions), out, "direction_norms")
        written += _save(plot_norm_vs_rank(directions), out, "norm_vs_rank")
        for name, d in directions.items():
            written += _save(plot_direction_similarity(d), out, f"direction_similarity_{_short(name)}")
    return written


def draw_topk_overlap(out: str | Path, model=None, *, n_prompts: int = 50, quiet: bool = True) -> list[Path]:
    """Top-20 overlap of SmolLM2 head rankings across scoring settings (scored now, on
    ``n_prompts`` prompts, when ``contextual_heads_<setting>.json`` is missing) and the
    causal ranking from patching."""
    from focuslens.data import make_synthetic_qa
    from focuslens.patching import PatchingResult
    from focuslens.scoring import HeadScores, score_heads
    from focuslens.viz import plot_topk_overlap

    out = Path(out)
    main = HeadScores.load(_need(out / "contextual_heads.json"))
    rankings = {"documents, prefix rows": main.ranking()}
    for suffix, kwargs in SCORING_SETTINGS.items():
        path = out / f"contextual_heads_{suffix}.json"
        if not path.exists():
            if model is None:
                continue
            examples = make_synthetic_qa(n_prompts, n_documents=20, seed=1)
            score_heads(model, examples, n_bootstrap=0, quiet=quiet, data=f"synthetic seed=1 n={n_prompts}",
                        **kwargs).save(path)
        s = HeadScores.load(path)
        rankings[f"{s.metadata['setting']}, {s.metadata['answer_rows']} rows"] = s.ranking()
    if (out / "patching.json").exists():
        rankings["causal (attribution patching)"] = PatchingResult.load(out / "patching.json").ranking("attribution")
    return _save(plot_topk_overlap(rankings, k=20), out, "topk_overlap")


def draw_all(out: str | Path = "figures", *, model=None, release_dir: str | Path | None = None) -> list[Path]:
    """Every figure of ``out`` from the saved results (the model is needed for the
    per-prompt views and the extra scoring settings), then ``README.md``."""
    out = Path(out)
    written = draw_distraction(out) + draw_contextual_heads(out) + draw_patching(out) + draw_split_softmax(out)
    for section in ("focus_directions", "focus_directions_5_documents"):
        if (out / f"{section}_test.csv").exists():
            written += draw_focus_directions(out, section)
    if model is not None:
        written += draw_prompt_views(out, model)
    written += draw_cross_family(out, release_dir)
    written += draw_topk_overlap(out, model)
    write_readme(out)
    return written


def write_readme(out: str | Path) -> Path:
    """``figures/README.md``: one line per figure that exists in ``out``."""
    out = Path(out)
    lines = ["# Figures", "", "Generated by `make demo` (experiments + figures) and `make figures` (figures from the",
             "saved results). PNG for papers; the HTML files (interactive, open offline) are written next",
             "to them and not committed (plotly.js is inlined in each).", "",
             "| figure | what it shows |", "|---|---|"]
    for stem, what in FIGURES.items():
        files = [f"`{p.name}`" for p in sorted(out.glob(f"{stem}.*")) if p.suffix in (".png", ".html", ".svg")]
        if files:
            lines.append(f"| {', '.join(files)} | {what} |")
    lines += ["", "Numbers behind them: `summary.json` (every number the demo prints) and `bench.json` (`make bench`)."]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
