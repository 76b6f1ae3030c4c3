"""Contextual scores: how much each head attends to the relevant document.

For a head (ℓ, h) and an example, take the attention rows of the *answer rows* R (the
query positions that produce the answer) and sum each row's mass over a key span S; the
score is the mean over rows, then over examples (Zhu et al. §3.2):

    s^{ℓ,h}(S) = mean_examples  (1/|R|) Σ_{i∈R} Σ_{j∈S} A^{ℓ,h}_{ij}

With S = the gold document this is the **contextual score**; the heads that score highest
are the *contextual heads*. We also report the mass on the irrelevant documents (their
sum and their max), the sink (first tokens), the question and the instruction, so every
row's mass is accounted for (they sum to at most 1).

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

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from focuslens.data.examples import QAExample
from focuslens.data.render import Prompt, render
from focuslens.errors import DataError, ModelError

__all__ = ["HeadScores", "score_heads", "prepare_prompts", "span_masses", "prompt_span_masses", "METRICS"]

#: The metrics of a :class:`HeadScores`, in order.
METRICS = ("gold", "irrelevant_sum", "irrelevant_max", "sink", "question", "instruction")
SETTINGS = ("documents", "gold_only")
ANSWER_ROWS = ("prefix", "greedy", "gold_answer")


# ------------------------------------------------------------------ results object
@dataclass
class HeadScores:
    """Per-head scores: a ``[n_layers, n_heads]`` tensor per metric plus metadata.

    Attributes:
        mean: metric -> mean over examples.
        ci_low, ci_high: metric -> bootstrap 95 % confidence bounds (may be empty).
        metadata: model, data, setting, answer-row source, n_examples, seed, ...
    """

    mean: dict[str, Float[Tensor, "layer head"]]
    ci_low: dict[str, Float[Tensor, "layer head"]] = field(default_factory=dict)
    ci_high: dict[str, Float[Tensor, "layer head"]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(next(iter(self.mean.values())).shape)

    @property
    def metrics(self) -> list[str]:
        return list(self.mean)

    def __getitem__(self, metric: str) -> Tensor:
        if metric not in self.mean:
            raise KeyError(f"no metric {metric!r}; available: {self.metrics}")
        return self.mean[metric]

    def ranking(self, metric: str = "gold") -> list[tuple[int, int]]:
        """All heads as (layer, head), best first (NaNs last)."""
        values = torch.nan_to_num(self[metric].float(), nan=float("-inf")).flatten()
        order = torch.argsort(values, descending=True, stable=True)
        n_heads = self.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads) for i in order]

    def top_k(self, k: int, metric: str = "gold") -> list[tuple[int, int]]:
        """The k best heads as (layer, head)."""
        return self.ranking(metric)[:k]

    def fraction_above(self, threshold: float, metric: str = "gold") -> float:
        return float((self[metric] > threshold).float().mean())

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per (layer, head, metric) with mean and CI bounds."""
        n_layers, n_heads = self.shape
        rows = []
        for metric, values in self.mean.items():
            lo, hi = self.ci_low.get(metric), self.ci_high.get(metric)
            for layer in range(n_layers):
                for head in range(n_heads):
                    rows.append(
                        {
                            "layer": layer,
                            "head": head,
                            "metric": metric,
                            "value": float(values[layer, head]),
                            "ci_low": float(lo[layer, head]) if lo is not None else float("nan"),
                            "ci_high": float(hi[layer, head]) if hi is not None else float("nan"),
                        }
                    )
        return pd.DataFrame(rows)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write JSON (tensors as nested lists) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": "focuslens.HeadScores/1",
            "metadata": self.metadata,
            "mean": {k: v.tolist() for k, v in self.mean.items()},
            "ci_low": {k: v.tolist() for k, v in self.ci_low.items()},
            "ci_high": {k: v.tolist() for k, v in self.ci_high.items()},
        }
        path.write_text(json.dumps(blob))
        return path

    @classmethod
    def load(cls, path: str | Path, *, model=None) -> HeadScores:
        """Read :meth:`save` output; with ``model``, check it was computed for that model."""
        blob = json.loads(Path(path).read_text())
        if blob.get("format") != "focuslens.HeadScores/1":
            raise DataError(f"{path} is not a focuslens HeadScores file (format={blob.get('format')!r}).")
        tensors = {k: {m: torch.tensor(v) for m, v in blob[k].items()} for k in ("mean", "ci_low", "ci_high")}
        scores = cls(**tensors, metadata=blob["metadata"])
        if model is not None:
            scores.check_model(model)
        return scores

    def check_model(self, model) -> None:
        """Raise ``ModelError`` unless these scores fit ``model`` (identity and shape)."""
        from focuslens.models import model_id

        want = (model.cfg.n_layers, model.cfg.n_heads)
        if self.shape != want:
            raise ModelError(
                f"scores have shape {self.shape} (layers, heads) but the model {model_id(model)!r} has {want}."
            )
        saved = self.metadata.get("model")
        if saved and saved != model_id(model):
            raise ModelError(
                f"scores were computed for model {saved!r}, not for the loaded {model_id(model)!r}."
            )

    # ---------------------------------------------------------------- the paper's format
    def to_ranking_json(self, path: str | Path, metric: str = "gold") -> Path:
        """Write the paper's ``relevant_heads.json``: every head as [layer, head], best first."""
        path = Path(path)
        path.write_text(json.dumps([list(h) for h in self.ranking(metric)]))
        return path

    @classmethod
    def from_ranking_json(
        cls, path: str | Path, *, n_layers: int | None = None, n_heads: int | None = None, model: str | None = None
    ) -> HeadScores:
        """Load a ranking file (the paper's ``relevant_heads.json``) with :meth:`from_ranking`."""
        ranking = json.loads(Path(path).read_text())
        if not ranking or not all(isinstance(h, list) and len(h) == 2 for h in ranking):
            raise DataError(f"{path}: expected a JSON list of [layer, head] pairs.")
        return cls.from_ranking(ranking, n_layers=n_layers, n_heads=n_heads, model=model, source=str(path))

    @classmethod
    def from_ranking(
        cls, ranking, *, n_layers: int | None = None, n_heads: int | None = None, model: str | None = None,
        source: str = "ranking",
    ) -> HeadScores:
        """A ranking of heads as scores: the best head gets ``n - 1``, the worst ``0``
        (metric ``"rank_score"``; unranked heads NaN), so ``top_k`` reproduces it."""
        n_layers = n_layers or 1 + max(h[0] for h in ranking)
        n_heads = n_heads or 1 + max(h[1] for h in ranking)
        values = torch.full((n_layers, n_heads), float("nan"))
        for rank, (layer, head) in enumerate(ranking):
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise DataError(f"{source}: head [{layer}, {head}] is outside {n_layers} layers × {n_heads} heads.")
            values[layer, head] = len(ranking) - 1 - rank
        meta = {"model": model, "source": source, "kind": "ranking", "n_ranked": len(ranking)}
        return cls(mean={"rank_score": values}, metadata=meta)

    def _repr_html_(self) -> str:
        metric = "gold" if "gold" in self.mean else self.metrics[0]
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{layer}</td><td>{head}</td><td>{float(self[metric][layer, head]):.3f}</td>"
            + (
                f"<td>[{float(self.ci_low[metric][layer, head]):.3f}, {float(self.ci_high[metric][layer, head]):.3f}]</td>"
                if metric in self.ci_low
                else "<td></td>"
            )
            + "</tr>"
            for i, (layer, head) in enumerate(self.top_k(10, metric))
        )
        meta = ", ".join(f"{k}={v}" for k, v in self.metadata.items() if k in ("model", "setting", "answer_rows", "n_examples"))
        return (
            f"<div><b>HeadScores</b> {self.shape[0]} layers × {self.shape[1]} heads; {meta}<br>"
            f"<table><tr><th>#</th><th>layer</th><th>head</th><th>{metric}</th><th>95% CI</th></tr>{rows}</table></div>"
        )

    def __repr__(self) -> str:
        return f"HeadScores(shape={self.shape}, metrics={self.metrics}, metadata={self.metadata})"


# ------------------------------------------------------------------ computation
def span_masses(
    pattern_rows: Float[Tensor, "head row key"], prompt: Prompt
) -> Float[Tensor, "head span"]:
    """Mean over rows of the mass on each span: documents first, then sink, question,
    instruction (``n_documents + 3`` columns)."""
    n_keys = pattern_rows.shape[-1]
    columns = [[s] for s in prompt.documents] + [[prompt.sink], list(prompt.questions or [prompt.question]),
                                                  [prompt.instruction]]
    indicator = torch.zeros(n_keys, len(columns), dtype=pattern_rows.dtype, device=pattern_rows.device)
    for col, spans in enumerate(columns):  # the question column covers every copy of the question
        for span in spans:
            indicator[span.start : span.end, col] = 1
    return (pattern_rows @ indicator).mean(dim=1)


def _check_prompt(prompt: Prompt, i: int) -> None:
    if prompt.gold_index is None:
        raise DataError(f"example {i} has no gold document (gold_index is None): it cannot be scored.")
    gold = prompt.gold
    if len(gold) == 0 or gold.start < 0 or gold.end > prompt.n_tokens:
        raise DataError(
            f"example {i}: the gold span {gold.start}..{gold.end} is empty or outside the prompt "
            f"of {prompt.n_tokens} tokens."
        )
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
    """Render examples for scoring: pick the setting and where the answer rows come from."""
    from focuslens.eval import greedy_generate

    if setting not in SETTINGS:
        raise DataError(f"setting={setting!r}: use one of {SETTINGS}.")
    if answer_rows not in ANSWER_ROWS:
        raise DataError(f"answer_rows={answer_rows!r}: use one of {ANSWER_ROWS}.")
    if not examples:
        raise DataError("the example list is empty: nothing to score.")
    prompts = []
    for i, ex in enumerate(tqdm(examples, desc="prepare", disable=quiet or answer_rows == "prefix", leave=False)):
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
    from focuslens.eval import first_token_id, next_token_logits
    from focuslens.models import model_id

    prompts = prepare_prompts(model, examples, setting=setting, answer_rows=answer_rows, quiet=quiet)
    for i, p in enumerate(prompts):
        _check_prompt(p, i)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    per_example = torch.zeros(len(prompts), n_layers, n_heads, len(METRICS))

    def hooks_for(batch: list[int]):
        def reduce(pattern, hook, layer):
            for row, i in enumerate(batch):
                p = prompts[i]
                rows = pattern[row, :, p.answer.start : p.answer.end, :].float()
                masses = span_masses(rows, p).cpu()  # [head, n_docs + 3]
                docs, rest = masses[:, : len(p.documents)], masses[:, len(p.documents) :]
                others = torch.cat([docs[:, : p.gold_index], docs[:, p.gold_index + 1 :]], dim=1)
                zero = torch.zeros(n_heads)
                per_example[i, layer] = torch.stack(
                    [
                        docs[:, p.gold_index],
                        others.sum(1) if others.numel() else zero,
                        others.max(1).values if others.numel() else zero,
                        rest[:, 0],
                        rest[:, 1],
                        rest[:, 2],
                    ],
                    dim=-1,
                )

        return [
            (f"blocks.{layer}.attn.hook_pattern", lambda x, hook, layer=layer: reduce(x, hook, layer))
            for layer in range(n_layers)
        ]

    logits = next_token_logits(model, prompts, batch_size=batch_size, hooks=hooks_for, quiet=quiet, desc="score heads")
    mean = {m: per_example[..., j].mean(0) for j, m in enumerate(METRICS)}
    ci_low, ci_high = {}, {}
    if n_bootstrap and len(prompts) > 1:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(prompts), (n_bootstrap, len(prompts)), generator=g)
        for j, m in enumerate(METRICS):
            boot = per_example[..., j][idx].mean(1)  # [n_bootstrap, L, H]
            ci_low[m], ci_high[m] = torch.quantile(boot, 0.025, dim=0), torch.quantile(boot, 0.975, dim=0)
    accuracy = None
    if all(p.example.answer_prefix and p.answer.end == p.n_tokens for p in prompts):
        gold = torch.tensor([first_token_id(model.tokenizer, p.example.answers[0]) for p in prompts])
        accuracy = float((logits.argmax(-1) == gold).float().mean())
    metadata = {
        "model": model_id(model),
        "setting": setting,
        "answer_rows": answer_rows,
        "n_examples": len(prompts),
        "n_documents": sorted({len(p.documents) for p in prompts}),
        "data": data,
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "accuracy": accuracy,
    }
    return HeadScores(mean=mean, ci_low=ci_low, ci_high=ci_high, metadata=metadata)


# ------------------------------------------------------------------ one prompt, any spans
@torch.no_grad()
def prompt_span_masses(
    model,
    prompt: Prompt,
    heads: int | Sequence[tuple[int, int]] | None = None,
    *,
    spans: dict[str, tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Attention mass from one prompt's answer rows onto each span, for each chosen head.

    For head (ℓ, h) and span S the value is ``(1/|R|) Σ_{i∈R} Σ_{j∈S} A^{ℓ,h}_{ij}`` with
    R = ``prompt.answer``. It is reduced inside the ``hook_pattern`` hooks (no pattern is
    kept) and the forward pass stops after the last chosen layer.

    Args:
        model: a ``TransformerBridge``.
        prompt: a rendered prompt.
        heads: None (every head), a layer index (every head of that layer), or
            ``(layer, head)`` pairs (kept in order, duplicates dropped).
        spans: span name -> key range, as a ``Span`` or ``(start, end)``. Default: ``sink``,
            ``instruction``, ``doc_0`` … ``doc_{n-1}``, ``question``. One-token spans give
            per-token masses.

    Returns:
        One row per head (index ``layer``, ``head``), one column per span. Disjoint spans
        sum to at most 1 per row. ``attrs`` records the model and the answer rows.

    >>> masses = prompt_span_masses(model, prompt, heads=[(14, 3), (15, 0)])   # doctest: +SKIP
    >>> masses.loc[(14, 3), f"doc_{prompt.gold_index}"]                        # doctest: +SKIP
    """
    from focuslens.models import model_id
    from focuslens.steering import head_mask

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if heads is None:
        chosen = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    elif isinstance(heads, int):
        if not 0 <= heads < n_layers:
            raise ModelError(
                f"heads={heads}: a layer index must be in 0..{n_layers - 1} "
                f"(the model has {n_layers} layers)."
            )
        chosen = [(heads, head) for head in range(n_heads)]
    else:
        chosen = list(dict.fromkeys((int(layer), int(head)) for layer, head in heads))
        if not chosen:
            raise ModelError("heads is empty: pass None (all heads), a layer index or (layer, head) pairs.")
        head_mask(model, chosen)  # raises ModelError for heads outside the model

    n_keys, rows = prompt.n_tokens, prompt.answer
    if len(rows) == 0 or rows.start < 0 or rows.end > n_keys:
        raise DataError(
            f"prompt.answer {rows.start}..{rows.end} is empty or outside the prompt of {n_keys} tokens."
        )
    if spans is None:
        spans = {name: s for name, s in prompt.spans().items() if name not in ("gold", "answer")}
        spans = {"sink": spans.pop("sink"), "instruction": spans.pop("instruction"), **spans}
    ranges = {
        name: (s.start, s.end) if hasattr(s, "start") else (int(s[0]), int(s[1])) for name, s in spans.items()
    }
    indicator = torch.zeros(n_keys, len(ranges))
    for col, (name, (start, end)) in enumerate(ranges.items()):
        if not 0 <= start < end <= n_keys:
            raise DataError(
                f"spans[{name!r}] = {start}..{end} is empty or outside the prompt of {n_keys} tokens."
            )
        indicator[start:end, col] = 1

    by_layer: dict[int, list[int]] = {}
    for layer, head in chosen:
        by_layer.setdefault(layer, []).append(head)
    found: dict[tuple[int, int], Tensor] = {}

    def reduce(pattern, hook, layer):
        hs = by_layer[layer]
        answer_rows = pattern[0, hs, rows.start : rows.end, :].float()  # [head, row, key]
        masses = (answer_rows @ indicator.to(answer_rows.device)).mean(1).cpu()
        found.update({(layer, h): m for h, m in zip(hs, masses)})

    hooks = [
        (f"blocks.{layer}.attn.hook_pattern", lambda x, hook, layer=layer: reduce(x, hook, layer))
        for layer in by_layer
    ]
    ids = prompt.input_ids[None].to(model.cfg.device)
    model.run_with_hooks(ids, fwd_hooks=hooks, stop_at_layer=max(by_layer) + 1)  # later layers are not needed
    table = pd.DataFrame(
        torch.stack([found[h] for h in chosen]).numpy(),
        index=pd.MultiIndex.from_tuples(chosen, names=["layer", "head"]),
        columns=list(ranges),
    )
    table.attrs.update(model=model_id(model), answer_rows=(rows.start, rows.end))
    return table

