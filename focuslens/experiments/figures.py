"""The figures in ``figures/``: each drawn from the results of a stage, in memory.

Every ``draw_*`` takes :class:`~focuslens.experiments.stages.StageResult` objects (and, for the views of
one prompt, a tokenizer to name its tokens): figures never run the model or read results
from disk. ``make demo`` draws them as the stages finish; ``make figures`` (``focuslens
figures``) reads the saved stages back (:func:`focuslens.experiments.stages.load_stage`) and redraws,
so a figure can be restyled without re-running its experiment. :data:`FIGURES` lists every
figure with a line on what it shows; ``figures/README.md`` is written from it.
"""

from __future__ import annotations

from pathlib import Path

from focuslens.data import render
from focuslens.experiments.stages import example_from_json
from focuslens.experiments.stages.long_context import slot_profiles
from focuslens.io import write_atomic
from focuslens.viz import (
    plot_long_context,
    plot_long_context_positions,
    plot_slot_profile,
    plot_direction_norms,
    plot_direction_similarity,
    plot_distraction,
    plot_document_attention,
    plot_focus_sweep,
    plot_head_locations,
    plot_head_map,
    plot_key_bias,
    plot_norm_vs_rank,
    plot_rank_agreement,
    plot_split_softmax_sweep,
    plot_topk_overlap,
    token_view,
)
from focuslens.viz.steering import _draws_phrase

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
    "long_context": "`make long-context`: accuracy (unsteered and with split-softmax on the top-20 heads, Wilson "
    "95% CIs) and the top heads' gold mass vs prompt length, ~1k to ~8k tokens (needle, NQ, key-value retrieval)",
    "long_context_positions": "the same by gold position (first / middle / last), one column per task",
    "long_context_slots_needle": "needle at its longest length: attention mass from the answer rows by document "
    "slot × layer (the attention-basin profile)",
    "long_context_slots_nq": "the same for NQ at 50 documents",
    "long_context_slots_kv": "the same for key-value retrieval at its largest key count",
    "nq_focus": "`make nq-focus`: focus directions at the paper's NQ size: gains in gold-answer log-prob and EM "
    "with question-clustered 95% CIs, per gold position, and the controls",
    "nq_focus_training": "the NQ training run: validation gold mass and mean ‖d_q‖ per epoch",
}

def _save(fig, out: Path, stem: str, **size) -> list[Path]:
    """``fig.save``: the figure's own layout size unless ``width``/``height`` are given."""
    written = fig.save(Path(out) / stem, **size)
    print("wrote", ", ".join(str(p) for p in written))
    return written


def _model(stage) -> str:
    return stage.summary.get("model", "the model")


def draw_distraction(stage, out: str | Path) -> list[Path]:
    """Accuracy vs number of documents (``run_distraction``)."""

    fig = plot_distraction(stage["distraction"], title=f"Distraction on {_model(stage)}: synthetic multi-document QA")
    return _save(fig, out, "distraction")


def draw_long_context(stage, out: str | Path) -> list[Path]:
    """Accuracy and gold mass vs context length (all prompts, and by gold position), and
    each task's slot × layer profile at its longest length (``run_long_context``)."""
    rows = stage["long_context"]
    paths = _save(plot_long_context(rows, title=f"Distraction at long context on {_model(stage)}"), out, "long_context")
    paths += _save(plot_long_context_positions(rows, title=f"Distraction at long context by gold position on "
                                               f"{_model(stage)}"), out, "long_context_positions")
    profiles = stage.objects.get("profiles") or (slot_profiles(stage["long_context_slots"])
                                                 if "long_context_slots" in stage.tables else {})
    for task, g in rows.groupby("task"):
        size = int(g["size"].max())
        key, n = f"{task}_{size}", int((g["size"] == size).sum())
        if key in profiles:
            paths += _save(plot_slot_profile(profiles[key], n, title=f"{task}, {size} slots: mass from the answer "
                                             f"rows by document slot and layer ({n} prompts)"), out, f"long_context_slots_{task}")
    return paths


def draw_contextual_heads(stage, out: str | Path) -> list[Path]:
    """The head-location map of the contextual scores (``run_contextual_heads``)."""

    return _save(plot_head_map(stage["contextual_heads"]), out, "contextual_heads", width=800, height=900)


def draw_patching(stage, heads_stage, out: str | Path) -> list[Path]:
    """Contextual score vs causal effect per head (``run_patching`` and ``run_contextual_heads``)."""

    scores, result = heads_stage["contextual_heads"], stage["patching"]
    fig = plot_rank_agreement(
        scores["gold"], result.scores["attribution"],
        x_label="contextual score (attention mass on the gold document)",
        y_label="causal effect (attribution patching, 0 = corrupted, 1 = clean)",
        title=f"Contextual score vs causal effect per head ({result.metadata.get('model')})<br>"
        f"<sup>Spearman {stage.summary['spearman']:+.2f} over all heads; red: top 10 contextual heads; "
        "grey labels: top 5 heads by causal effect</sup>",
        highlight=scores.ranking()[:10],
    )
    return _save(fig, out, "patching_agreement")


def draw_split_softmax(stage, out: str | Path) -> list[Path]:
    """Paper Fig. 3 (``run_split_softmax``)."""

    sweep, s = stage["split_softmax_sweep"], stage.summary
    refs = {k: s[k] for k in ("gold_only", "baseline", "no_gold") if k in s}
    n_draws = sweep[sweep.group == "random"].draw.nunique()
    fig = plot_split_softmax_sweep(
        sweep, references=refs,
        title=f"Split-softmax on {_model(stage)}: contextual vs random heads<br><sup>{sweep.example.nunique()} held-out "
        f"{int(sweep.n_documents.iloc[0])}-document prompts; random: {_draws_phrase(n_draws)}; "
        "smaller τ = stronger boost of the gold document</sup>",
    )
    return _save(fig, out, "split_softmax", width=900, height=560)


def draw_focus_directions(stage, out: str | Path) -> list[Path]:
    """Paper Fig. 4 (``run_focus_directions``); the file is named after the stage's section."""

    test, s = stage[f"{stage.section}_test"], stage.summary
    refs = {k: s[f"{k}_test"] for k in ("gold_only", "baseline", "no_gold") if f"{k}_test" in s}
    fig = plot_focus_sweep(
        test, references=refs, chosen={"k": s["best"]["k"], "alpha": s["best"]["alpha"]},
        title=f"Focus directions on {_model(stage)}: held-out accuracy vs α<br><sup>{test.example.nunique()} prompts, "
        f"{int(test.n_documents.iloc[0])} documents; α·d_q on the top-k contextual heads at the {s['rows']} rows, no "
        "label of the relevant document</sup><br><sup>bars: Wilson 95% CI; circle: (k, α) chosen on validation</sup>",
    )
    return _save(fig, out, stage.section)


def draw_prompt_views(stage, out: str | Path, tokenizer) -> list[Path]:
    """Document map, token view and key bias of the prompt of ``run_prompt_views``;
    ``tokenizer`` renders the prompt again when the stage was loaded from disk."""

    prompt = stage.objects.get("prompt")
    if prompt is None:
        prompt = render(example_from_json(stage.summary["example"]), tokenizer)
    model = _model(stage)
    written = _save(plot_document_attention(stage["document_attention"], prompt, model_name=model), out,
                    "document_attention")
    written.append(token_view(stage["token_masses"], prompt, tokenizer, model_name=model).save(Path(out) / "token_view"))
    print("wrote", written[-1])
    if "key_bias" in stage.tables:
        bias = stage["key_bias"]
        bias.attrs.setdefault("alpha", stage.summary["alpha"])
        written += _save(plot_key_bias(bias, prompt, tokenizer, model_name=model), out, "key_bias")
    return written


# ------------------------------------------------------------------ across models
def _short(name: str) -> str:
    lowered = name.lower()
    return next((k for k in ("smollm2", "llama", "qwen", "mistral") if k in lowered), lowered.split("-")[0])


def draw_cross_family(out: str | Path, scores, directions=None, released: dict | None = None) -> list[Path]:
    """Head locations and direction comparisons: our ``scores`` (and trained ``directions``)
    next to the paper's released artifacts (``released``: name -> FocusDirections, e.g.
    :func:`focuslens.experiments.pipeline.load_release`)."""

    ours = scores.metadata.get("model", "ours")
    theirs = {d.model.split("/")[-1]: d for d in (released or {}).values()}
    if not theirs:
        print(f"no released artifacts given: cross-family figures show {ours} only")
    written = _save(plot_head_locations({ours: scores, **theirs}, top_k=20), out, "head_locations")
    every = ({ours: directions} if directions is not None else {}) | theirs
    if every:
        written += _save(plot_direction_norms(every), out, "direction_norms")
        written += _save(plot_norm_vs_rank(every), out, "norm_vs_rank")
        for name, d in every.items():
            written += _save(plot_direction_similarity(d), out, f"direction_similarity_{_short(name)}")
    return written


def draw_topk_overlap(out: str | Path, heads_stage, patching_stage=None) -> list[Path]:
    """Top-20 overlap between the rankings of the contextual-heads stage (its main and
    extra scoring settings) and the causal ranking of the patching stage."""

    rankings = {}
    for scores in heads_stage.artifacts.values():
        rankings[f"{scores.metadata['setting']}, {scores.metadata['answer_rows']} rows"] = scores.ranking()
    if patching_stage is not None:
        rankings["causal (attribution patching)"] = patching_stage["patching"].ranking("attribution")
    k = min(20, *(len(r) for r in rankings.values()))  # a small model has fewer heads
    return _save(plot_topk_overlap(rankings, k=k), out, "topk_overlap")


def draw_all(results: dict, out: str | Path = "figures", *, tokenizer=None, released: dict | None = None) -> list[Path]:
    """Every figure of the stages in ``results`` (section -> StageResult), then ``README.md``."""
    out = Path(out)
    heads, patching = results.get("contextual_heads"), results.get("patching")
    written = draw_distraction(results["distraction"], out) if "distraction" in results else []
    if heads is not None:
        written += draw_contextual_heads(heads, out)
        written += draw_patching(patching, heads, out) if patching is not None else []
        trained = results.get("focus_directions")
        written += draw_cross_family(out, heads["contextual_heads"],
                                     trained["focus_directions"] if trained is not None else None, released)
        written += draw_topk_overlap(out, heads, patching)
    if "split_softmax" in results:
        written += draw_split_softmax(results["split_softmax"], out)
    for section in ("focus_directions", "focus_directions_5_documents"):
        if section in results:
            written += draw_focus_directions(results[section], out)
    if "prompt_views" in results and tokenizer is not None:
        written += draw_prompt_views(results["prompt_views"], out, tokenizer)
    write_readme(out)
    return written


def write_readme(out: str | Path) -> Path:
    """``figures/README.md``: one line per figure that exists in ``out``, written atomically
    (:func:`~focuslens.io.write_atomic`) like every file focuslens saves."""
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
    return write_atomic(out / "README.md", "\n".join(lines) + "\n")
