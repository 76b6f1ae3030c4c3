"""Applying focus directions: add ``α·d_q`` to the queries (and ``α·d_k`` to the keys) of
chosen heads, after RoPE, without labels (Zhu et al. §3.4).

:func:`focus` is the context manager, :func:`focus_hooks` its hook specs (one batch row
per variant, for sweeps). ``rows`` says which query positions are steered: ``"all"`` (the
paper's intervention, every position) or ``"answer"`` (the answer rows and later, which
lets one prefill serve a whole sweep). :func:`focus_sweep` measures a (ranking, k, α) grid
with exactly the hooks the context manager installs; :class:`MagnitudeControl` sets α per
prompt so the attention moved off the sink stays in a range calibrated on validation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.render import Prompt
from focuslens.directions.artifact import FocusDirections
from focuslens.errors import DataError, ModelError
from focuslens.measure.evaluate import evaluate_variants, generate_variants
from focuslens.measure.forward import check_context
from focuslens.model.heads import (
    Head,
    HookSpec,
    head_masks,
    per_variant,
    ranking_of,
    variant_masks,
)
from focuslens.model.hooks import attn_hook
from focuslens.model.intervention import HeadIntervention
from focuslens.model.load import attention_scaling
from focuslens.model.rope import position_hooks
from focuslens.model.spans import resolve_rows, rows_mask

__all__ = ["Focus", "focus_hooks", "focus", "focus_variants", "focus_sweep", "best_setting", "MagnitudeControl"]


# ------------------------------------------------------------------ hooks and the context manager
def _row_gate(where, state: dict):
    """``x -> [batch or 1, pos, 1, 1]``: 1 on the steered rows (from the RoPE positions the
    position hooks recorded in ``state``), 0 elsewhere; ``where=None`` steers every row (1.0)."""

    def row_gate(x: Tensor) -> Tensor | float:
        if where is None:
            return 1.0
        if "positions" not in state:
            raise ModelError("no RoPE positions were recorded in this forward pass; use rows='all'.")
        pos = state["positions"].to(x.device)
        return rows_mask(where, pos.reshape(-1, x.shape[1]))[..., None, None].to(x.dtype)

    return row_gate


def _key_bias_hook(delta_k: Tensor, stash: dict, row_gate, scale: float):
    """A ``hook_attn_scores`` hook adding ``scale·(steered q_i)·Δk`` to every score of row i:
    the key vector per query head, which works under grouped-query attention too."""

    def add_k(scores, hook):  # scores: [batch, head, q, key]
        q = stash.pop("q")
        delta = delta_k.to(scores.device).expand(scores.shape[0], -1, -1)
        row = torch.einsum("bqhd,bhd->bhq", q * row_gate(q), delta)
        return scores + scale * row[..., None]

    return add_k


def focus_hooks(
    model,
    directions: FocusDirections,
    alpha: float | Sequence[float] | Tensor = 0.5,
    heads=20,
    *,
    ranking=None,
    rows="all",
    prompt: Prompt | None = None,
    keys: bool = False,
    strict: bool = True,
) -> list[HookSpec]:
    """Hook specs adding ``α·d_q`` to the queries of the chosen heads (and, with
    ``keys=True``, ``α·d_k`` to their keys), at ``rows``.

    Args:
        heads: any selection of :func:`~focuslens.model.heads.resolve_heads`; an int
            (default 20, as :func:`focus`) is the top k of ``ranking`` (default: the
            directions' own ``ranking()``); or a ``[variant, layer, head]`` mask with
            ``alpha`` one value per variant (batch row).
        ranking: what an int ``heads`` takes the top k of (HeadScores, PatchingResult,
            FocusDirections, (layer, head) pairs).
        rows: where the queries are steered (:data:`focuslens.steer.split_softmax.ROWS`): ``"all"``
            (default: every position, as the paper), ``"answer"`` (the answer rows of
            ``prompt`` and every later position, e.g. generated tokens), a start position,
            a :class:`~focuslens.data.render.Span` or a list of positions.
        prompt: the prompt that ``rows="answer"`` refers to.
        keys: also apply the key vectors. They change nothing (module docstring), so they
            are off by default; on, they are added per query head as the paper does (under
            grouped-query attention through ``hook_attn_scores``: ``(q_i+α d_q)·α d_k/√d``),
            on the same rows.
    """
    directions.check_model(model, strict=strict)
    where = resolve_rows(rows, prompt)
    masks = variant_masks(model, heads, _ranking(directions, heads, ranking))
    alphas = per_variant(alpha, masks.shape[0], "alpha")
    scale = attention_scaling(model)
    state: dict = {}
    hooks: list[HookSpec] = [] if where is None else position_hooks(model, state, where, rows)
    row_gate = _row_gate(where, state)
    for layer in masks.any(0).any(-1).nonzero().flatten().tolist():
        gate = alphas[:, None, None] * masks[:, layer, :, None]  # [variant, head, 1]
        delta_q = (gate * directions.q[layer].float()).to(model.cfg.dtype)  # [variant, head, d_head]
        stash: dict[str, Tensor] = {}

        def add_q(x, hook, delta=delta_q, stash=stash):
            x = x + delta.to(x.device)[:, None] * row_gate(x)  # x: [batch, pos, head, d_head]
            if keys:
                stash["q"] = x
            return x

        hooks.append((attn_hook(layer, "rot_q"), add_q))
        if keys:
            delta_k = (gate * directions.k[layer].float()).to(model.cfg.dtype)
            hooks.append((attn_hook(layer, "attn_scores"), _key_bias_hook(delta_k, stash, row_gate, scale)))
    return hooks


def _ranking(directions: FocusDirections, heads, ranking):
    """The ranking an int ``heads`` refers to: ``ranking``, else the directions' own."""
    if ranking is not None or not isinstance(heads, int):
        return ranking
    if not directions.ranking():
        raise DataError(f"heads={heads}: these directions carry no head ranking; pass ranking=<HeadScores, ...> "
                        "or heads=[(layer, head), ...].")
    return directions


@dataclass
class Focus(HeadIntervention):
    """Focus directions as a value: ``α·d_q`` added after RoPE to the queries of ``heads``
    at ``rows`` (and ``α·d_k`` to their keys with ``keys=True``); no labels. Usable as
    ``with iv.on(model):``, in ``evaluate_next_token(..., intervention=iv)``,
    ``evaluate_generation`` and sweeps. Fields as in :func:`focus_hooks`.

    >>> evaluate_next_token(model, test, intervention=Focus(dirs, alpha=0.5)).correct.mean()  # doctest: +SKIP
    """

    directions: FocusDirections
    alpha: object = 0.5
    heads: object = 20
    ranking: object = None
    rows: object = "all"
    keys: bool = False
    strict: bool = True

    STRENGTH = "alpha"
    METHOD, NEEDS_LABEL = "focus", False
    PAPER = "Zhu et al. 2025, Focus Directions (arXiv 2503.23306)"

    @classmethod
    def candidates(cls, context):
        """α over the top k heads of the directions' own ranking (none without directions)."""
        if context.directions is None:
            return []
        return [({"alpha": a}, cls(context.directions, alpha=a, heads=context.k, rows=context.rows))
                for a in (0.25, 0.5, 1.0, 2.0)]

    def ranking_for(self, model):
        return _ranking(self.directions, self.heads, self.ranking)

    def variant_hooks(self, model, prompt, masks: Tensor, strength: Tensor) -> list[HookSpec]:
        return focus_hooks(model, self.directions, strength, masks, rows=self.rows, prompt=prompt, keys=self.keys,
                           strict=self.strict)


def focus(model, directions: FocusDirections, alpha: float = 0.5, heads=20, *, ranking=None, rows="all",
          prompt: Prompt | None = None, keys: bool = False, strict: bool = True):
    """Context manager: steer ``heads`` with ``α·directions`` at ``rows`` while the block
    runs (forward passes and ``model.generate``); no span labels are needed. Hooks are
    removed on exit, also on error. Arguments as in :func:`focus_hooks` (the same defaults:
    the top 20 heads of the directions' ranking); :func:`focus_sweep` measures exactly this.

    >>> with focus(model, dirs, alpha=0.5, heads=20):             # doctest: +SKIP
    ...     out = model.generate(prompt, max_new_tokens=16, do_sample=False)
    """
    return Focus(directions, alpha, heads, ranking, rows, keys, strict).on(model, prompt)


# ------------------------------------------------------------------ sweeps (paper Fig. 4)
def focus_variants(model, directions: FocusDirections, ks: Sequence[int | None] | dict, alphas: Sequence[float],
                   rankings: dict[str, Sequence[Head]] | None = None) -> tuple[list[tuple[str, int, float]], Tensor]:
    """The (ranking, k, α) grid of a sweep, α = 0 included for every k, and its
    ``[variant, layer, head]`` head masks. ``rankings`` (default: ``{"directions":
    directions.ranking}``) names the head orders that ``k`` takes the top of (k = None: every
    head; ``ks`` may also map each ranking to its own k values)."""

    rankings = rankings or {"directions": directions.ranking()}
    everyone = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    grid, groups = [], []
    for name, ranking in rankings.items():
        ranking = ranking_of(ranking, field=f"rankings[{name!r}]")
        for k in (ks[name] if isinstance(ks, dict) else ks):
            if k is not None and not 0 < k <= len(ranking):
                raise DataError(f"k={k}: ranking {name!r} has {len(ranking)} heads.")
            for alpha in sorted({0.0, *map(float, alphas)}):
                grid.append((name, k or len(everyone), alpha))
                groups.append(ranking[:k] if k is not None else everyone)
    return grid, head_masks(model, groups)


def focus_sweep(
    model,
    directions: FocusDirections,
    examples: Sequence,
    *,
    ks: Sequence[int | None] | dict[str, Sequence[int | None]] = (1, 5, 10, 20, 50, None),
    alphas: Sequence[float] = (-0.5, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0, 2.0),
    rows: str = "all",
    rankings: dict[str, Sequence[Head]] | None = None,
    max_new_tokens: int | None = None,
    return_logits: bool = False,
    prefills=None,
    quiet: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, Tensor]:
    """Accuracy with ``α·d_q`` on the top-k heads of ``directions.ranking`` (or of each of
    ``rankings``; ``k=None``: all heads), for every k and α, at ``rows`` (``"all"``, the
    paper's, or ``"answer"``); no span labels are used to steer.

    Every cell equals :func:`focus` with the same arguments on that prompt (tested). With
    ``rows="answer"`` one prefill per example serves every variant; with ``"all"`` every
    variant re-runs the whole prompt (a few variants per batch). Each k also runs at α = 0
    (the unsteered model, so ``gold_mass``/``sink_mass`` of the same heads before
    steering). Returns one row per (example, variant) with ``ranking``, ``k``, ``alpha``,
    ``group`` (``"top"``; ``"all"`` where every head is steered), the accuracy columns, and the steered heads' ``gold_mass`` and ``sink_mass`` at the answer
    rows (and the logits ``[example, variant, vocab]`` with ``return_logits``). With
    ``max_new_tokens`` each variant answers by greedy generation instead, scored with
    ``best_subspan_em`` (:func:`focuslens.measure.evaluate.generate_variants`). ``prefills``: a
    :class:`~focuslens.model.prefix.PrefillStore` shared with other answer-row sweeps.
    """

    check_context(model, examples)
    grid, masks = focus_variants(model, directions, ks, alphas, rankings)
    sweep = Focus(directions, torch.tensor([a for _, _, a in grid]), masks, rows=rows)
    desc = f"focus sweep ({rows} rows)"
    if max_new_tokens is not None:
        df = generate_variants(model, examples, sweep, max_new_tokens=max_new_tokens, probe_heads=masks, quiet=quiet,
                               desc=desc)
    else:
        df = evaluate_variants(model, examples, sweep, probe_heads=masks, return_logits=return_logits,
                               prefills=prefills, quiet=quiet, desc=desc)
    df, logits = df if return_logits else (df, None)
    n_model_heads = model.cfg.n_layers * model.cfg.n_heads
    meta = pd.DataFrame([{"ranking": r, "k": k, "alpha": a, "group": "all" if k == n_model_heads else "top"}
                         for r, k, a in grid])
    df = df.join(meta, on="variant")
    return (df, logits) if return_logits else df


def best_setting(sweep: pd.DataFrame, *, by: Sequence[str] = ("k", "alpha")) -> dict:
    """The setting with the highest accuracy (ties: higher mean margin), as a dict of the
    ``by`` columns plus ``accuracy``."""
    keys = ["correct", "margin"] if "margin" in sweep else ["correct"]  # generated answers have no margin
    table = sweep.groupby(list(by))[keys].mean()
    best = table.sort_values(keys, ascending=False).index[0]
    best = best if isinstance(best, tuple) else (best,)
    return {**{c: (v.item() if hasattr(v, "item") else v) for c, v in zip(by, best)},
            "accuracy": float(table.loc[best if len(best) > 1 else best[0], "correct"])}


# ------------------------------------------------------------------ magnitude control
@dataclass
class MagnitudeControl:
    """Per-prompt strength without labels: keep the attention that the steered heads move
    off the sink within the range calibrated on validation prompts.

    The ICLR revision of the paper frames focus directions as moving attention "from the
    attention sink to the contexts", and too much movement as harmful. Prompts differ in
    how far a fixed α moves them. The controller reads, per prompt, the steered heads' sink
    mass at α = 0 and over a grid of α, and takes the **largest α whose moved mass
    ``sink(0) − sink(α)`` stays at or below the calibrated upper bound** (α = 0, no
    steering, if even the smallest α overshoots). The range is the ``quantiles`` of the
    moved mass over validation prompts at the best fixed α. Only the sink span, never the
    gold document, is read.

    Attributes:
        k: the number of top heads steered.
        target: the median moved mass at ``alpha`` on the validation prompts.
        low, high: the calibrated range (quantiles of that moved mass).
        alpha: the fixed α it was calibrated at.
        grid: the α values the controller may choose from (α ≥ 0, 0 included).
        ranking: the head ranking of the sweep rows it reads (None: a sweep of one ranking).
    """

    k: int
    target: float
    alpha: float
    grid: tuple[float, ...]
    low: float = -math.inf
    high: float = math.inf
    ranking: str | None = None

    @classmethod
    def fit(cls, sweep: pd.DataFrame, k: int, alpha: float, grid: Sequence[float] | None = None, *,
            ranking: str | None = None, quantiles: tuple[float, float] = (0.25, 0.75)) -> MagnitudeControl:
        """Calibrate on the prompts of a :func:`focus_sweep` table (e.g. validation) at (k, α)."""
        moved = _moved_sink(sweep, k, ranking)
        if alpha not in moved.columns:
            raise DataError(f"alpha={alpha} was not run for k={k} in this sweep (have {sorted(moved.columns)}).")
        grid = tuple(sorted({0.0, *(a for a in (grid if grid is not None else moved.columns) if a >= 0)}))
        at = moved[alpha]
        return cls(k=int(k), target=float(at.median()), alpha=float(alpha), grid=grid,
                   low=float(at.quantile(quantiles[0])), high=float(at.quantile(quantiles[1])), ranking=ranking)

    def choose(self, moved: Float[Tensor, "grid"] | np.ndarray | Sequence[float]) -> float:
        """The largest grid α whose moved sink mass is at most ``high`` (else 0)."""
        ok = [a for a, m in zip(self.grid, [float(m) for m in moved]) if m <= self.high]
        return max(ok) if ok else 0.0

    def apply_to_sweep(self, sweep: pd.DataFrame) -> pd.DataFrame:
        """Per prompt of a sweep table: the chosen α and that variant's row (as if the
        controller had run at inference: it reads only sink masses)."""
        moved = _moved_sink(sweep, self.k, self.ranking)
        missing = [a for a in self.grid if a not in moved.columns]
        if missing:
            raise DataError(f"the sweep lacks alpha={missing} for k={self.k}.")
        chosen = {i: self.choose(row[list(self.grid)].to_numpy()) for i, row in moved.iterrows()}
        rows = _rows_of(sweep, self.k, self.ranking)
        return rows[rows.alpha == rows["example"].map(chosen)].drop_duplicates("example")

    def alpha_for(self, model, directions: FocusDirections, prompt: Prompt, *, rows: str = "all") -> float:
        """Choose α for one prompt at inference: a sweep of the grid at ``rows`` measuring
        the steered heads' sink mass."""
        sweep = focus_sweep(model, directions, [prompt], ks=(self.k,), alphas=self.grid, rows=rows, quiet=True)
        return self.choose(_moved_sink(sweep, self.k).iloc[0][list(self.grid)].to_numpy())


def _rows_of(sweep: pd.DataFrame, k: int, ranking: str | None) -> pd.DataFrame:
    sub = sweep[sweep.k == k]
    if ranking is not None:
        sub = sub[sub.ranking == ranking]
    if sub.empty:
        raise DataError(f"k={k}{'' if ranking is None else f', ranking={ranking!r}'} is not in this sweep "
                        f"(have k={sorted(sweep.k.unique())}).")
    return sub


def _moved_sink(sweep: pd.DataFrame, k: int, ranking: str | None = None) -> pd.DataFrame:
    """``sink(α=0) − sink(α)`` per prompt (rows) and α (columns) for the top-k heads."""
    table = _rows_of(sweep, k, ranking).pivot_table(index="example", columns="alpha", values="sink_mass")
    if 0.0 not in table.columns:
        raise DataError("the sweep has no alpha=0 run to measure the unsteered sink mass.")
    return table.rsub(table[0.0], axis=0)
