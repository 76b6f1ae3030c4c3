"""Contextual scores: how much each head attends to the relevant document.

For a head (ℓ, h) and an example, take the attention rows of the *answer rows* R (the
query positions that produce the answer) and sum each row's mass over a key span S; the
score is the mean over rows, then over examples (Zhu et al. §3.2):

    s^{ℓ,h}(S) = mean_examples  (1/|R|) Σ_{i∈R} Σ_{j∈S} A^{ℓ,h}_{ij}

With S = the gold document this is the **contextual score**; the heads that score highest
are the *contextual heads*. We also report the mass on the irrelevant documents (their
sum and their max), the sink (first tokens), the question and the instruction, so every
row's mass is accounted for (they sum to at most 1).

**Chance level.** A head that attends uniformly to every key it can see (causal) gives
the span S the share ``|S ∩ [0, i]| / (i + 1)`` at answer row i — for the gold document,
which precedes the answer, ``|gold| / (i + 1)``. Averaged over answer rows and prompts
like the score itself, that is the metric's *chance level*
(:func:`chance_metrics`; ``HeadScores.chance``). Layer-0 heads often sit near it: a gold
score of 0.06 at chance 0.05 is no contextual head. ``HeadScores.times_chance`` divides
by it (1 = chance).

The reduction happens inside the ``hook_pattern`` hooks: only ``[heads, spans]`` numbers
per layer and example are kept, never an attention pattern, so memory stays that of a
plain forward pass (the eager attention transient itself is unavoidable in the bridge).

Answer rows come from one of three sources, recorded in the metadata:

* ``"prefix"`` — the forced answer prefix (``"Varnex Motors is based in"``);
* ``"greedy"`` — the model's own greedy answer on the scored prompt;
* ``"gold_answer"`` — the greedy answer on the gold-only prompt, appended to the scored
  prompt (the paper's choice for training data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.examples import QAExample
from focuslens.data.render import Prompt, Span, candidate_token_ids, render
from focuslens.errors import DataError, ModelError
from focuslens.io import read_json, write_json
from focuslens.measure.evaluate import greedy_generate
from focuslens.measure.forward import check_context, shared_logits
from focuslens.model.finite import require_finite
from focuslens.measure.record import Recording
from focuslens.measure.results import HeadResult, is_head_ranking
from focuslens.measure.stats import bootstrap_ci
from focuslens.model.heads import resolve_heads
from focuslens.model.hooks import key_indicator, mass_on
from focuslens.model.load import model_id
from focuslens.model.parallel import cat, is_main, share
from focuslens.model.spans import require_gold, resolve_span
from focuslens.progress import tqdm

__all__ = ["HeadScores", "score_heads", "scores_from_patterns", "head_metrics", "chance_metrics",
           "uniform_pattern", "prepare_prompts", "span_masses", "prompt_span_masses", "part_spans", "token_window",
           "token_masses", "METRICS"]

#: The metrics of a :class:`HeadScores`, in order.
METRICS = ("gold", "irrelevant_sum", "irrelevant_max", "sink", "question", "instruction")
SETTINGS = ("documents", "gold_only")
ANSWER_ROWS = ("prefix", "greedy", "gold_answer")


# ------------------------------------------------------------------ results object
@dataclass(repr=False)
class HeadScores(HeadResult):
    """Per-head scores: a ``[n_layers, n_heads]`` tensor per metric plus metadata
    (ranking, top-k, DataFrame, save/load: :class:`~focuslens.measure.results.HeadResult`).

    Attributes:
        mean: metric -> mean over examples.
        ci_low, ci_high: metric -> bootstrap 95 % confidence bounds (may be empty).
        metadata: model, data, setting, answer-row source, n_examples, seed, ...
        chance: metric -> its chance level, the score of a head with uniform causal
            attention (module docstring), one number for every head. Empty for rankings
            and for files saved before it existed: :meth:`chance_level` is then NaN.
    """

    VALUES, TENSORS, KIND, DEFAULT = "mean", ("mean", "ci_low", "ci_high"), "metric", "gold"
    EXTRAS = ("chance",)
    FORMAT = "focuslens.HeadScores/1"

    mean: dict[str, Float[Tensor, "layer head"]]
    ci_low: dict[str, Float[Tensor, "layer head"]] = field(default_factory=dict)
    ci_high: dict[str, Float[Tensor, "layer head"]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return self.names

    def fraction_above(self, threshold: float, metric: str = "gold") -> float:
        return float((self[metric] > threshold).float().mean())

    # ---------------------------------------------------------------- chance level
    def chance_level(self, metric: str | None = None) -> float:
        """The chance level of ``metric`` (default ``"gold"``); NaN if unknown."""
        value = self.chance.get(self._name(metric))
        return float("nan") if value is None else float(value)

    def times_chance(self, metric: str | None = None) -> Float[Tensor, "layer head"]:
        """Each head's score over its chance level: 1 = what uniform attention gives,
        3 = three times that; NaN where the chance level is unknown."""
        return self.tensor(metric) / self.chance_level(metric)

    def to_dataframe(self) -> pd.DataFrame:
        """:meth:`HeadResult.to_dataframe` plus ``chance`` (the metric's chance level) and
        ``times_chance`` (value / chance; ≤ 1: no better than uniform attention), NaN
        where unknown; ``attrs["chance"]`` holds the levels."""
        df = super().to_dataframe()
        df["chance"] = [self.chance_level(m) for m in df["metric"]]
        df["times_chance"] = df["value"] / df["chance"]
        df.attrs["chance"] = dict(self.chance)
        return df

    # ---------------------------------------------------------------- the paper's format
    def to_ranking_json(self, path: str | Path, metric: str = "gold") -> Path:
        """Write the paper's ``relevant_heads.json``: every head as [layer, head], best first."""
        path = Path(path)

        write_json(path, [list(h) for h in self.ranking(metric)])
        return path

    @classmethod
    def from_ranking_json(
        cls, path: str | Path, *, n_layers: int | None = None, n_heads: int | None = None, model: str | None = None
    ) -> HeadScores:
        """Load a ranking file (the paper's ``relevant_heads.json``) with :meth:`from_ranking`."""
        ranking = read_json(Path(path), "head ranking")
        if not is_head_ranking(ranking):
            raise DataError(f"{path}: expected a JSON list of [layer, head] pairs of ints, best first.")
        return cls.from_ranking(ranking, n_layers=n_layers, n_heads=n_heads, model=model, source=str(path))

    @classmethod
    def _from_blob(cls, blob, path: Path, model=None) -> HeadScores:
        """:meth:`load` reads both formats: a :meth:`save` file, or a ranking file (a JSON
        list of [layer, head], best first, as :meth:`to_ranking_json` writes it) that
        becomes :meth:`from_ranking` scores (metric ``"rank_score"``, shaped like ``model``
        when given, since a top-k ranking need not reach the last layer)."""
        if not is_head_ranking(blob):
            return super()._from_blob(blob, path, model)
        shape = (model.cfg.n_layers, model.cfg.n_heads) if model is not None else (None, None)
        return cls.from_ranking(blob, n_layers=shape[0], n_heads=shape[1],
                                model=model_id(model) if model is not None else None, source=str(path))

    @classmethod
    def from_ranking(
        cls, ranking, *, n_layers: int | None = None, n_heads: int | None = None, model: str | None = None,
        source: str = "ranking",
    ) -> HeadScores:
        """A ranking of heads as scores: the best head gets ``n - 1``, the worst ``0``
        (metric ``"rank_score"``; unranked heads NaN), so ``top_k`` reproduces it."""
        if not ranking:
            raise DataError(f"{source}: the ranking is empty; list at least one [layer, head].")
        seen = set()
        for layer, head in ranking:
            if (layer, head) in seen:
                raise DataError(f"{source}: head [{layer}, {head}] is ranked more than once.")
            seen.add((layer, head))
        n_layers = n_layers or 1 + max(h[0] for h in ranking)
        n_heads = n_heads or 1 + max(h[1] for h in ranking)
        values = torch.full((n_layers, n_heads), float("nan"))
        for rank, (layer, head) in enumerate(ranking):
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ModelError(f"{source}: head [{layer}, {head}] is outside {n_layers} layers × {n_heads} heads.")
            values[layer, head] = len(ranking) - 1 - rank
        meta = {"model": model, "source": source, "kind": "ranking", "n_ranked": len(ranking)}
        return cls(mean={"rank_score": values}, metadata=meta)


def span_masses(
    pattern_rows: Float[Tensor, "head row key"], prompt: Prompt
) -> Float[Tensor, "head span"]:
    """Mean over rows of the mass on each span: documents first, then sink, question,
    instruction (``n_documents + 3`` columns; the question column covers every copy)."""
    return mass_on(pattern_rows, key_indicator(pattern_rows.shape[-1], list(score_columns(prompt).values())))


def score_columns(prompt: Prompt) -> dict[str, list[Span]]:
    """The span columns :data:`METRICS` are computed from: every document (``doc_1`` …),
    then ``sink``, ``question`` (every copy) and ``instruction``."""
    return {**{f"doc_{i + 1}": [s] for i, s in enumerate(prompt.documents)}, "sink": [prompt.sink],
            "question": list(prompt.questions or [prompt.question]), "instruction": [prompt.instruction]}


def uniform_pattern(prompt: Prompt) -> Float[Tensor, "1 row key"]:
    """The attention pattern of a head with no preference, at the answer rows: row i
    spreads its mass evenly over the ``i + 1`` keys it can see (causal mask)."""
    rows = torch.arange(prompt.answer.start, prompt.answer.end)[:, None]
    keys = torch.arange(prompt.n_tokens)[None]
    return ((keys <= rows).float() / (rows + 1))[None]


def chance_metrics(prompt: Prompt) -> Float[Tensor, "metric"]:
    """One prompt's chance level of each of :data:`METRICS`: :func:`head_metrics` of the
    :func:`uniform_pattern` (for gold, the mean over answer rows of |gold| / (i + 1)).

    >>> chance_metrics(prompt)[METRICS.index("gold")]      # doctest: +SKIP
    """
    return head_metrics(uniform_pattern(prompt), prompt)[0]


def _check_prompt(prompt: Prompt, i: int) -> None:
    require_gold(prompt, i, "it cannot be scored")
    if len(prompt.answer) == 0 or prompt.answer.end > prompt.n_tokens:
        raise DataError(f"example {i}: the answer rows {prompt.answer} are empty or outside the prompt.")


def prepare_prompts(
    model,
    examples: Sequence[QAExample | Prompt],
    *,
    setting: str = "documents",
    answer_rows: str = "prefix",
    max_new_tokens: int = 8,
    quiet: bool = False,
) -> list[Prompt]:
    """Render examples for scoring: pick the setting and where the answer rows come from.
    Prompts pass through, checked against the model's context (:func:`~focuslens.measure.forward.check_context`)."""

    if setting not in SETTINGS:
        raise DataError(f"setting={setting!r}: use one of {SETTINGS}.")
    if answer_rows not in ANSWER_ROWS:
        raise DataError(f"answer_rows={answer_rows!r}: use one of {ANSWER_ROWS}.")
    if not examples:
        raise DataError("the example list is empty: nothing to score.")
    check_context(model, examples)
    prompts = []
    for i, ex in enumerate(tqdm(examples, desc="prepare", disable=quiet or answer_rows == "prefix" or not is_main(), leave=False)):
        if isinstance(ex, Prompt):
            prompts.append(ex)
            continue
        ex = ex.gold_only() if setting == "gold_only" else ex
        if ex.gold_index is None:
            raise DataError(f"example {i} has no gold document (gold_index is None): it cannot be scored.")
        prefix = ex.answer_prefix or ""
        response = None
        if answer_rows == "greedy":
            response = prefix + greedy_generate(model, render(ex, model.tokenizer), max_new_tokens=max_new_tokens)
        elif answer_rows == "gold_answer":
            response = prefix + greedy_generate(model, render(ex.gold_only(), model.tokenizer), max_new_tokens=max_new_tokens)
        if response is not None and not response.strip():
            response = None
        prompts.append(render(ex, model.tokenizer, response=response, max_length=model.cfg.n_ctx))
    return prompts


def score_heads(
    model,
    examples: Sequence[QAExample | Prompt],
    *,
    setting: str = "documents",
    answer_rows: str = "prefix",
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    quiet: bool = False,
    data: str | None = None,
) -> HeadScores:
    """Contextual scores of every head, reduced inside the attention-pattern hooks.

    Args:
        model: a ``TransformerBridge`` (see :func:`focuslens.load_model`).
        examples: examples (rendered here) or already rendered prompts.
        setting: ``"documents"`` (the N-document prompt) or ``"gold_only"``.
        answer_rows: ``"prefix"``, ``"greedy"`` or ``"gold_answer"`` (module docstring).
        n_bootstrap: bootstrap resamples of the examples for the 95 % CI (0: none).
        seed: bootstrap seed.
        data: a description of the data for the metadata (e.g. ``"synthetic seed=0"``).

    Returns:
        :class:`HeadScores` with metrics :data:`METRICS` and, in the metadata, the
        next-token accuracy of the scored prompts.
    """

    prompts = prepare_prompts(model, examples, setting=setting, answer_rows=answer_rows, quiet=quiet)
    for i, p in enumerate(prompts):
        _check_prompt(p, i)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    per_example = torch.zeros(len(prompts), n_layers, n_heads, len(METRICS))
    recordings = []

    def hooks_for(batch: list[int]):  # one recording of every head per batch of prompts
        recordings.append((batch, Recording(model, "all", score_columns, prompts=[prompts[i] for i in batch])))
        return recordings[-1][1].hooks()

    # prompts shared over processes under a launcher (focuslens.model.parallel); each fills its rows
    logits = shared_logits(model, prompts, batch_size=batch_size, hooks=hooks_for, quiet=quiet, desc="score heads")
    require_finite(logits, "score_heads: the logits [prompt, vocab]")
    for batch, rec in recordings:
        for row, i in enumerate(batch):  # masses [layer·head, column] of each prompt
            per_example[i] = metrics_of_masses(rec.row(row), prompts[i]).view(n_layers, n_heads, len(METRICS))
    mine = share(len(prompts))
    per_example = cat(per_example[mine.start : mine.stop], len(prompts))
    accuracy = None
    if all(p.example.answer_prefix and p.answer.end == p.n_tokens for p in prompts):
        gold = torch.tensor([candidate_token_ids(model.tokenizer, p.example)[0] for p in prompts])
        accuracy = float((logits.argmax(-1) == gold).float().mean())
    metadata = {"model": model_id(model), "setting": setting, "answer_rows": answer_rows, "data": data,
                "accuracy": accuracy}
    return _head_scores(per_example, prompts, metadata, n_bootstrap=n_bootstrap, seed=seed)


def head_metrics(pattern_rows: Float[Tensor, "head row key"], prompt: Prompt) -> Float[Tensor, "head metric"]:
    """One prompt's :data:`METRICS` per head from its answer-row attention pattern: the
    gold document's mass, the irrelevant documents' sum and max, sink, question,
    instruction (each the mean over rows of the summed mass)."""
    return metrics_of_masses(span_masses(pattern_rows, prompt).cpu(), prompt)


def metrics_of_masses(masses: Float[Tensor, "head column"], prompt: Prompt) -> Float[Tensor, "head metric"]:
    """:data:`METRICS` per head from its masses on :func:`score_columns`."""
    docs, rest = masses[:, : len(prompt.documents)], masses[:, len(prompt.documents) :]
    others = torch.cat([docs[:, : prompt.gold_index], docs[:, prompt.gold_index + 1 :]], dim=1)
    zero = torch.zeros(masses.shape[0])
    return torch.stack([docs[:, prompt.gold_index], others.sum(1) if others.numel() else zero,
                        others.max(1).values if others.numel() else zero, rest[:, 0], rest[:, 1], rest[:, 2]], dim=-1)


def scores_from_patterns(model, prompts: Sequence[Prompt], pattern: Float[Tensor, "prompt layer head row key"], *,
                         setting: str = "documents", n_bootstrap: int = 0, seed: int = 0,
                         data: str | None = None) -> HeadScores:
    """:func:`score_heads` without running the model: the same scores from answer-row
    patterns already captured, e.g. ``collect_attention_inputs(...).pattern`` (one forward
    per prompt then serves both scoring and direction training)."""

    if pattern.shape[0] != len(prompts) or pattern.shape[1:3] != (model.cfg.n_layers, model.cfg.n_heads):
        raise DataError(f"pattern of shape {tuple(pattern.shape)} does not match {len(prompts)} prompts of a model "
                        f"with {model.cfg.n_layers} layers x {model.cfg.n_heads} heads.")
    per_example = torch.zeros(*pattern.shape[:3], len(METRICS))
    for i, p in enumerate(prompts):
        _check_prompt(p, i)
        rows = pattern[i, :, :, : len(p.answer), : p.n_tokens]
        for layer in range(pattern.shape[1]):
            per_example[i, layer] = head_metrics(rows[layer], p)
    metadata = {"model": model_id(model), "setting": setting, "answer_rows": "captured", "data": data,
                "accuracy": None}
    return _head_scores(per_example, prompts, metadata, n_bootstrap=n_bootstrap, seed=seed)


def _head_scores(per_example: Tensor, prompts: Sequence[Prompt], metadata: dict, *, n_bootstrap: int,
                 seed: int, metrics: Sequence[str] = METRICS) -> HeadScores:
    """Means over prompts (and bootstrap CIs) of ``per_example [prompt, layer, head, metric]``
    (``metrics`` names the last axis; chance levels are known for :data:`METRICS`)."""
    mean = {m: per_example[..., j].mean(0) for j, m in enumerate(metrics)}
    ci_low, ci_high = {}, {}
    if n_bootstrap and len(prompts) > 1:  # one percentile bootstrap over prompts for every head and metric at once
        low, high = bootstrap_ci(per_example.reshape(len(prompts), -1), n_resamples=n_bootstrap, seed=seed)
        low, high = (torch.from_numpy(b).reshape(per_example.shape[1:]).to(per_example) for b in (low, high))
        for j, m in enumerate(metrics):
            ci_low[m], ci_high[m] = low[..., j].contiguous(), high[..., j].contiguous()
    metadata = {**metadata, "n_examples": len(prompts), "n_documents": sorted({len(p.documents) for p in prompts}),
                "seed": seed, "n_bootstrap": n_bootstrap}
    chance = torch.stack([chance_metrics(p) for p in prompts]).mean(0)  # from the prompts: no forward pass
    return HeadScores(mean=mean, ci_low=ci_low, ci_high=ci_high, metadata=metadata,
                      chance={m: float(chance[j]) for j, m in enumerate(METRICS) if m in mean})


# ------------------------------------------------------------------ one prompt, any spans
@torch.no_grad()
def prompt_span_masses(
    model,
    prompt: Prompt,
    heads="all",
    *,
    ranking=None,
    layer: int | None = None,
    spans: dict | None = None,
) -> pd.DataFrame:
    """Attention mass from one prompt's answer rows onto each span, for each chosen head.

    For head (ℓ, h) and span S the value is ``(1/|R|) Σ_{i∈R} Σ_{j∈S} A^{ℓ,h}_{ij}`` with
    R = ``prompt.answer``. It is reduced inside the ``hook_pattern`` hooks (no pattern is
    kept) and the forward pass stops after the last chosen layer.

    Args:
        model: a ``TransformerBridge``.
        prompt: a rendered prompt.
        heads, ranking, layer: the selection, read by
            :func:`focuslens.model.heads.resolve_heads`: "all" (every head), k (the top k of
            ``ranking``), ``(layer, head)`` pairs (kept in order, duplicates dropped); or
            ``layer=`` for every head of one layer.
        spans: column name -> a span name of the prompt, a ``Span`` or ``(start, end)``
            (:func:`~focuslens.model.spans.resolve_span`); read by a
            :class:`~focuslens.measure.record.Recording`. Default: ``sink``,
            ``instruction``, ``doc_1`` … ``doc_n`` (as the prompt numbers them), ``question``. One-token spans give
            per-token masses.

    Returns:
        One row per head (index ``layer``, ``head``), one column per span. Disjoint spans
        sum to at most 1 per row. ``attrs`` records the model and the answer rows.

    >>> masses = prompt_span_masses(model, prompt, heads=[(14, 3), (15, 0)])   # doctest: +SKIP
    >>> masses.loc[(14, 3), prompt.gold_name]          # "doc_{g+1}"          # doctest: +SKIP
    """

    chosen = resolve_heads(model, heads, ranking, layer=layer)
    if not chosen:
        raise DataError("heads is empty: pass None (all heads), k with a ranking, (layer, head) pairs or layer=.")

    rows = prompt.answer
    if len(rows) == 0 or rows.start < 0 or rows.end > prompt.n_tokens:
        raise DataError(
            f"prompt.answer {rows.start}..{rows.end} is empty or outside the prompt of {prompt.n_tokens} tokens."
        )
    named = part_spans(prompt) if spans is None else spans
    rec = Recording(model, chosen, {name: resolve_span(s, prompt, field=f"spans[{name!r}]") for name, s in named.items()},
                    prompt=prompt)
    with torch.no_grad(), model.hooks(fwd_hooks=rec.hooks()):  # later layers are not needed
        model(prompt.input_ids[None].to(model.cfg.device), stop_at_layer=rec.last_layer + 1)
    table = rec.table()
    table.attrs.update(model=model_id(model), answer_rows=(rows.start, rows.end))
    return table


def part_spans(prompt: Prompt) -> dict[str, Span]:
    """The parts of a prompt in reading order: ``sink``, ``instruction``, ``doc_1`` …
    ``doc_n``, ``question`` (the default spans of :func:`prompt_span_masses`)."""
    spans = {name: s for name, s in prompt.spans().items() if name not in ("gold", "answer")}
    return {"sink": spans.pop("sink"), "instruction": spans.pop("instruction"), **spans}


def token_window(prompt: Prompt, window: Span | tuple[int, int] | None = None) -> Span:
    """A token window of ``prompt``: ``window`` checked, or (None) the gold document with one
    neighbouring document on each side."""
    if window is None:
        if prompt.gold_index is None:
            raise DataError("window=None needs a gold document, but prompt.gold_index is None: pass window=(start, end).")
        docs, g = prompt.documents, prompt.gold_index
        return Span(docs[max(g - 1, 0)].start, docs[min(g + 1, len(docs) - 1)].end)
    return resolve_span(window, prompt, field="window")


def token_masses(model, prompt: Prompt, heads="all", *, ranking=None, layer: int | None = None,
                 window: Span | tuple[int, int] | None = None) -> pd.DataFrame:
    """:func:`prompt_span_masses` token by token over :func:`token_window`: one row per
    head, one column per token position of the window (what
    :func:`focuslens.viz.token_view` draws)."""
    span = token_window(prompt, window)
    masses = prompt_span_masses(model, prompt, heads, ranking=ranking, layer=layer,
                                spans={i: (i, i + 1) for i in span})
    masses.attrs["window"] = (span.start, span.end)
    return masses
