"""Attention steering on chosen heads: split-softmax, as hook specs and a context manager.

**Split-softmax** (Li et al. 2024; Zhu et al. §3.5) raises a head's attention to a span S
without changing anything else about the row. For a query row with attention ``a_j`` and
mass ``π = Σ_{j∈S} a_j`` on the span::

    a'_j = a_j · π^τ / π              for j in S
    a'_j = a_j · (1 − π^τ) / (1 − π)  otherwise

so the span's mass becomes exactly ``π^τ``, the row still sums to 1, and the relative
weights inside and outside the span are kept. ``τ = 1`` is the identity; smaller ``τ`` is a
stronger boost (π = 0.05: τ = 0.5 → 0.22, τ = 0.1 → 0.74). It needs the span's label (which
document is relevant), so it is an analysis tool: the causal test that contextual heads
matter. Focus directions (:mod:`focuslens.directions.artifact`) do the same without the label.

The hooks edit ``blocks.{l}.attn.hook_pattern`` (post-softmax, ``[batch, head, query,
key]``), which the bridge's attention uses for its output. Query rows are located by
absolute position (``key_len − query_len + i``), so the same hooks are right in a full
forward pass, in KV-cached generation (one query row per step) and in a
:class:`~focuslens.model.prefix.PrefixCache` run.

Every knob can differ per batch row (*variant*): a ``[variant, layer, head]`` head mask and
a ``[variant]`` vector of τ, so one batched run evaluates a whole sweep.

>>> with split_softmax(model, heads=[(15, 6), (23, 2)], span=prompt.gold, tau=0.1):  # doctest: +SKIP
...     logits = model(prompt.input_ids[None])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from focuslens.data.render import Span
from focuslens.errors import DataError
from focuslens.measure.evaluate import evaluate_variants
from focuslens.measure.forward import check_context
from focuslens.model.heads import (
    HookSpec,
    head_masks,
    per_variant,
    top_and_random,
    variant_masks,
)
from focuslens.model.spans import Rows
from focuslens.steer.span_mass import SpanMassEdit, reweight_pattern, span_mass_hooks

__all__ = ["SplitSoftmax", "split_softmax_pattern", "split_softmax_hooks", "split_softmax", "split_softmax_sweep"]


# ------------------------------------------------------------------ the operation
def _power(pi: Tensor, tau: Tensor) -> Tensor:
    """Split-softmax's new span mass ``π^τ``."""
    return pi.clamp_min(0) ** tau


def split_softmax_pattern(
    pattern: Float[Tensor, "batch head query key"],
    span: Bool[Tensor, "*batch key"],
    tau: float | Float[Tensor, "..."],
) -> Float[Tensor, "batch head query key"]:
    """Split-softmax of attention rows: the mass on ``span`` becomes ``π^τ`` (module docstring).

    ``tau`` broadcasts over ``[batch, head, query]`` (use 1 to leave a row untouched). Rows
    with no mass on the span (π = 0) or all of it (π = 1) are left unchanged. Computed in
    float32, returned in the pattern's dtype (:func:`~focuslens.steer.span_mass.reweight_pattern`).
    """
    return reweight_pattern(pattern, span, _power, tau)


def _check_tau(taus: Tensor) -> None:
    if (taus <= 0).any():
        raise DataError(f"tau={taus.tolist()} must be > 0 (1 is the identity, smaller boosts more).")


def split_softmax_hooks(
    model,
    heads,
    span: str | Span | Bool[Tensor, "*batch key"] = "gold",
    tau: float | Sequence[float] | Tensor = 0.1,
    *,
    ranking=None,
    rows: Rows = "all",
    prompt=None,
) -> list[HookSpec]:
    """Hook specs that apply split-softmax on the chosen heads.

    Args:
        model: a ``TransformerBridge``.
        heads: any selection of :func:`~focuslens.model.heads.resolve_heads` (an int is the
            top k of ``ranking``); or a ``[variant, layer, head]`` mask, one selection per
            batch row (a single selection broadcasts to every row).
        span: the boosted key positions: a span name of ``prompt`` (``"gold"``, the
            default, ``"doc_3"``, …: :func:`~focuslens.model.spans.resolve_span`), a
            :class:`Span`, or a boolean mask ``[key]`` or ``[batch, key]`` over the prompt
            (keys past its end are outside the span).
        ranking: what an int ``heads`` takes the top k of (HeadScores, PatchingResult,
            FocusDirections or (layer, head) pairs).
        tau: the exponent, one value or one per variant.
        rows: which query rows to edit (:data:`ROWS`): ``"all"`` (default, every row),
            ``"answer"`` (the answer rows of ``prompt`` and later positions), a start
            position, a :class:`Span` or a list of positions.
        prompt: the :class:`~focuslens.data.render.Prompt` that ``rows="answer"`` refers to.
    """
    masks = variant_masks(model, heads, ranking)
    _check_tau(per_variant(tau, masks.shape[0], "tau"))
    return span_mass_hooks(model, masks, span, tau, new_mass=_power, identity=1.0, name="tau", rows=rows,
                           prompt=prompt)


@dataclass
class SplitSoftmax(SpanMassEdit):
    """Split-softmax as a value (module docstring): the span's mass on ``heads`` becomes
    ``π^τ`` at ``rows``. Usable as ``with iv.on(model, prompt):``, in
    ``evaluate_next_token(..., intervention=iv)`` and in sweeps.

    Attributes:
        heads: any head selection; an int is the top k of ``ranking`` (default 20, as the
            paper's top-k heads; the same default as :class:`~focuslens.steer.focus.Focus`).
        ranking: the ranking an int refers to (HeadScores, PatchingResult, FocusDirections,
            pairs).
        span: a span name resolved per prompt (default ``"gold"``) or a :class:`Span`.
        tau: the exponent (1 is the identity), one value or one per variant.
        rows: :data:`~focuslens.model.spans.ROWS` (default ``"all"``).

    >>> iv = SplitSoftmax(20, ranking=scores, tau=0.1)                # doctest: +SKIP
    >>> evaluate_next_token(model, test, intervention=iv).correct.mean()   # doctest: +SKIP
    """

    heads: object = 20
    ranking: object = None
    span: object = "gold"
    tau: object = 0.1
    rows: object = "all"

    STRENGTH, IDENTITY = "tau", 1.0
    METHOD, NEEDS_LABEL = "split_softmax", True
    PAPER = "Li et al. 2024 (COLM 2024); Zhu et al. 2025 §3.5"
    new_mass = staticmethod(_power)
    check_strength = staticmethod(_check_tau)

    @classmethod
    def candidates(cls, context):
        return [({"tau": t}, cls(context.k, context.ranking, tau=t, rows=context.rows)) for t in (0.5, 0.3, 0.1)]


def split_softmax(
    model,
    heads=20,
    span: str | Span | Bool[Tensor, "*batch key"] = "gold",
    tau: float | Sequence[float] | Tensor = 0.1,
    *,
    ranking=None,
    rows: Rows = "all",
    prompt=None,
):
    """Context manager: split-softmax on ``heads`` while the block runs (forward passes and
    ``model.generate``); the hooks are removed on exit, also on error. Arguments as in
    :class:`SplitSoftmax` (``prompt`` resolves a span name and ``rows="answer"``);
    :func:`split_softmax_sweep` measures exactly this.

    >>> with split_softmax(model, 20, ranking=scores, prompt=prompt, tau=0.1):  # doctest: +SKIP
    ...     logits = model(prompt.input_ids[None])
    """
    return SplitSoftmax(heads, ranking, span, tau, rows).on(model, prompt)


# ------------------------------------------------------------------ the sweep (paper Fig. 3)
def split_softmax_sweep(
    model,
    examples: Sequence,
    ranking,
    *,
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    taus: Sequence[float] = (0.8, 0.5, 0.3, 0.1),
    n_random: int = 3,
    seed: int = 0,
    rows: str = "all",
    return_logits: bool = False,
    prefills=None,
    quiet: bool = False,
):
    """Accuracy with split-softmax on the top-k heads of ``ranking`` and on ``n_random``
    random sets of k heads (drawn, seeded, outside the top k), for every k and τ, boosting
    each prompt's gold document at ``rows`` (``"all"`` or ``"answer"``).

    Every cell equals :func:`split_softmax` with the same arguments on that prompt (tested).
    With ``rows="answer"`` one prefill per example serves every variant; ``"all"`` runs the
    whole prompt once per variant (:func:`focuslens.measure.evaluate.evaluate_variants`); ``prefills``
    (a :class:`~focuslens.model.prefix.PrefillStore`) shares the prefill with other sweeps.
    Returns one row per (example, variant) with ``group`` (``"none"``, ``"top"``,
    ``"random"``), ``k``, ``tau``, ``draw``, the accuracy columns and ``gold_mass`` (the
    steered heads' mass on the gold document, as steered). τ = 1 is the identity, so the
    ``"none"`` variant is the baseline for every k.
    """


    check_context(model, examples)
    # the same order as before: per k, per tau, the top group then its random draws
    groups = top_and_random(model, ranking, ks, n_random, seed)
    variants = [("none", 0, 1.0, 0, [])]
    for k in ks:
        mine = [g for g in groups if g[1] == k]
        for tau in taus:
            variants += [(group, k, float(tau), draw, heads) for group, _, draw, heads in mine]
    masks = head_masks(model, [v[4] for v in variants])
    sweep = SplitSoftmax(masks, span="gold", tau=torch.tensor([v[2] for v in variants]), rows=rows)
    df = evaluate_variants(model, examples, sweep, probe_heads=masks, return_logits=return_logits, prefills=prefills,
                           quiet=quiet, desc=f"split-softmax sweep ({rows} rows)")
    df, logits = df if return_logits else (df, None)
    meta = pd.DataFrame([{"group": g, "k": k, "tau": t, "draw": d} for g, k, t, d, _ in variants])
    df = df.join(meta, on="variant")
    return (df, logits) if return_logits else df
