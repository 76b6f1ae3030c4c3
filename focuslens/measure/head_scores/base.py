"""The field's head scores on one engine: each score is a few lines over span masses.

Retrieval heads (Wu et al. 2024), QRHead (Zhang et al. 2025), CoRe (Tran et al. 2025), ICR
(Chen et al. 2025) and the contextual score of Zhu et al. (2025) all rank heads by where
their attention goes. Each is a short computation on the same reduction: the mass some query
rows put on some key spans (:func:`~focuslens.model.hooks.mass_on`, read by one
:class:`~focuslens.measure.record.Recording`), sometimes on a second input (a content-free
question, the gold answer appended). So a score here declares only

* ``passes`` — which inputs it reads (``"prompt"``: the rendered prompt; others are
  registered with :func:`register_pass`, e.g. ``"content_free"``, ``"forced"``);
* ``rows`` — which query rows of each input (``"answer"``: the prompt's answer rows;
  ``"question"``: its question tokens);
* :meth:`HeadScore.columns` — the key spans whose masses it needs (names of
  :meth:`~focuslens.data.render.Prompt.spans`), and ``top_keys`` if it needs each row's
  most-attended key;
* :meth:`HeadScore.combine` — one prompt's ``[layer, head]`` score from those readings.

:func:`rank_heads_by` runs **one forward pass per prompt and input** for every score
together (one recording per row set, the union of the columns), so adding a score costs no
extra pass unless it needs a new input. A score that is not attention mass (the causal
effect of patching) overrides :meth:`HeadScore.compute` instead. The result is one
:class:`~focuslens.measure.scoring.HeadScores` with one metric per score: rankings,
``top_k``, bootstrap CIs, DataFrames and every head-location figure work on it unchanged.

Adding a score is one module in this folder: subclass :class:`HeadScore` with a ``name``;
the folder's ``__init__`` imports every module, which registers it in :data:`SCORES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.examples import QAExample
from focuslens.data.render import Prompt
from focuslens.errors import DataError
from focuslens.measure.record import Recording
from focuslens.model.load import model_id
from focuslens.progress import tqdm

__all__ = ["HeadScore", "Reading", "SCORES", "PASSES", "register_pass", "rank_heads_by", "with_rows", "ROW_SETS"]

#: name -> score class, filled as the modules of this folder are imported.
SCORES: dict[str, type[HeadScore]] = {}
#: name -> ``(model, prompt) -> Prompt``: the inputs a score may read (module docstring).
PASSES: dict[str, Callable] = {}
#: The query rows a score may read: the prompt's answer rows, or its (last) question.
ROW_SETS = ("answer", "question")


def register_pass(name: str):
    """Decorator: register ``fn(model, prompt) -> Prompt`` as input ``name`` (the prompt a
    score reads; its spans are found by name, so they may move)."""

    def add(fn):
        PASSES[name] = fn
        return fn

    return add


@register_pass("prompt")
def _the_prompt(model, prompt: Prompt) -> Prompt:
    return prompt


def with_rows(prompt: Prompt, rows: str) -> Prompt:
    """``prompt`` whose ``answer`` span (the rows a recording reads) is ``rows``: the
    answer rows themselves, or the question's tokens."""
    if rows == "answer":
        return prompt
    if rows == "question":
        return dataclasses.replace(prompt, answer=prompt.question)
    raise DataError(f"rows={rows!r}: a head score reads one of {ROW_SETS}.")


@dataclasses.dataclass
class Reading:
    """What one prompt's recordings hold for a score: ``masses[(pass, rows)]`` ``[layer,
    head, column]`` by :meth:`column`, ``top_keys[(pass, rows)]`` ``[layer, head, row]``
    (absolute key positions), and ``inputs[pass]`` (the prompt each pass ran)."""

    masses: dict[tuple[str, str], Tensor]
    names: dict[tuple[str, str], list[str]]
    top_keys: dict[tuple[str, str], Tensor]
    inputs: dict[str, Prompt]

    def column(self, name: str, pass_: str = "prompt", rows: str = "answer") -> Float[Tensor, "layer head"]:
        """The mass on column ``name`` (a span name) read at ``rows`` of ``pass_``."""
        key = (pass_, rows)
        if key not in self.masses:
            raise DataError(f"nothing was read at {rows} rows of the {pass_!r} input: declare it in passes/rows.")
        if name not in self.names[key]:
            raise DataError(f"column {name!r} was not read at {key}: declare it in columns().")
        return self.masses[key][..., self.names[key].index(name)]


class HeadScore:
    """A head score (module docstring). Subclasses set ``name`` (which registers them),
    ``paper`` (the citation), ``needs_label`` (whether the gold document must be known to
    score), ``passes``, ``rows``, ``top_keys``, and implement :meth:`columns` and
    :meth:`combine` (or :meth:`compute`)."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    needs_label: ClassVar[bool] = True
    passes: ClassVar[tuple[str, ...]] = ("prompt",)
    rows: ClassVar[tuple[str, ...]] = ("answer",)
    top_keys: ClassVar[bool] = False
    #: where the score sits in default listings (new scores: after the built-in ones)
    ORDER: ClassVar[int] = 100

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):
            if cls.name in SCORES and SCORES[cls.name].__qualname__ != cls.__qualname__:
                raise DataError(f"two head scores are named {cls.name!r}: {SCORES[cls.name]} and {cls}.")
            SCORES[cls.name] = cls

    def columns(self, prompt: Prompt) -> dict[str, object]:
        """Column name -> span (name, Span or list) of ``prompt`` whose mass this score reads."""
        return {}

    def combine(self, reading: Reading, prompt: Prompt) -> Float[Tensor, "layer head"]:
        """One prompt's score of every head from its :class:`Reading`."""
        raise NotImplementedError

    def compute(self, model, prompts: Sequence[Prompt], *, quiet: bool = False) -> Tensor | None:
        """``[prompt, layer, head]`` scores computed some other way (None: from the
        readings, the default)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _instances(scores) -> list[HeadScore]:
    names = sorted(SCORES, key=lambda n: (SCORES[n].ORDER, n)) if scores is None else [scores] if isinstance(scores, (str, HeadScore)) else list(scores)
    out = []
    for s in names:
        if isinstance(s, HeadScore):
            out.append(s)
        elif isinstance(s, str) and s in SCORES:
            out.append(SCORES[s]())
        else:
            raise DataError(f"scores: {s!r} is not a head score; choose from {sorted(SCORES)} or pass a HeadScore.")
    if len({s.name for s in out}) != len(out):
        raise DataError(f"scores: a name appears twice in {[s.name for s in out]}.")
    return out


def _read_prompt(model, prompt: Prompt, scores: list[HeadScore]) -> Reading:
    """Every reading ``scores`` need from one prompt: one forward pass per input."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    reading = Reading({}, {}, {}, {})
    for pass_ in dict.fromkeys(p for s in scores for p in s.passes):
        if pass_ not in PASSES:
            raise DataError(f"input {pass_!r} is not registered; known: {sorted(PASSES)}.")
        run = PASSES[pass_](model, prompt)
        reading.inputs[pass_] = run
        recordings = {}
        for rows in dict.fromkeys(r for s in scores if pass_ in s.passes for r in s.rows):
            mine = [s for s in scores if pass_ in s.passes and rows in s.rows]
            view = with_rows(run, rows)
            columns = {name: span for s in mine for name, span in s.columns(view).items()}
            recordings[rows] = Recording(model, "all", columns, prompt=view, top_keys=any(s.top_keys for s in mine))
        hooks = [h for rec in recordings.values() for h in rec.hooks()]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):  # no logits: the last block's residual is enough
            model(run.input_ids[None].to(model.cfg.device), stop_at_layer=n_layers)
        for rows, rec in recordings.items():
            key = (pass_, rows)
            reading.masses[key] = rec.row(0).view(n_layers, n_heads, -1)
            reading.names[key] = rec.names
            if rec.top_keys:
                reading.top_keys[key] = rec.row_top_keys(0).view(n_layers, n_heads, -1)
    return reading


def rank_heads_by(
    model,
    examples: Sequence[QAExample | Prompt],
    scores: Sequence[str | HeadScore] | str | None = None,
    *,
    answer_rows: str = "prefix",
    n_bootstrap: int = 1000,
    seed: int = 0,
    quiet: bool = False,
    data: str | None = None,
):
    """Every head under several of the field's scores, on the same prompts.

    Args:
        model: a ``TransformerBridge``.
        examples: examples (rendered as :func:`~focuslens.measure.scoring.score_heads`
            renders them) or prompts; each needs a gold document.
        scores: names of :data:`SCORES` (default: all of them) or :class:`HeadScore` s.
        answer_rows: where the answer rows come from (``"prefix"``, ``"greedy"``,
            ``"gold_answer"``: :func:`~focuslens.measure.scoring.prepare_prompts`).
        n_bootstrap, seed: the 95 % bootstrap CI over prompts of every head's mean.

    Returns:
        :class:`~focuslens.measure.scoring.HeadScores` with one metric per score (the mean
        over prompts); ``metadata["scores"]`` gives each score's paper and whether it needs
        the label. Compare rankings with :func:`~focuslens.viz.compare` tools or
        ``scores.ranking("query_focused")``.

    >>> ranks = rank_heads_by(model, examples[:50], ["contextual", "query_focused", "contrastive"])  # doctest: +SKIP
    >>> ranks.top_k(20, "contrastive")                                                      # doctest: +SKIP
    """
    from focuslens.measure.scoring import _head_scores, prepare_prompts
    from focuslens.model.spans import require_gold

    chosen = _instances(scores)
    prompts = prepare_prompts(model, examples, answer_rows=answer_rows, quiet=quiet)
    for i, p in enumerate(prompts):
        require_gold(p, i, "it cannot be scored")
    per_example = torch.zeros(len(prompts), model.cfg.n_layers, model.cfg.n_heads, len(chosen))
    computed = {j: s.compute(model, prompts, quiet=quiet) for j, s in enumerate(chosen)}
    readers = [s for j, s in enumerate(chosen) if computed[j] is None]
    if readers:
        for i, p in enumerate(tqdm(prompts, desc="head scores", disable=quiet, leave=False)):
            reading = _read_prompt(model, p, readers)
            for j, s in enumerate(chosen):
                if computed[j] is None:
                    per_example[i, ..., j] = s.combine(reading, p).float()
    for j, values in computed.items():
        if values is not None:
            per_example[..., j] = values.float()
    metadata = {"model": model_id(model), "setting": "documents", "answer_rows": answer_rows, "data": data,
                "scores": {s.name: {"paper": s.paper, "needs_label": s.needs_label, "passes": list(s.passes),
                                    "rows": list(s.rows)} for s in chosen}}
    return _head_scores(per_example, prompts, metadata, n_bootstrap=n_bootstrap, seed=seed,
                        metrics=tuple(s.name for s in chosen))

