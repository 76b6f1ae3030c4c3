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
matter. Focus directions (:mod:`focuslens.directions`) do the same without the label.

The hooks edit ``blocks.{l}.attn.hook_pattern`` (post-softmax, ``[batch, head, query,
key]``), which the bridge's attention uses for its output. Query rows are located by
absolute position (``key_len − query_len + i``), so the same hooks are right in a full
forward pass, in KV-cached generation (one query row per step) and in a
:class:`~focuslens.kvcache.PrefixCache` run.

Every knob can differ per batch row (*variant*): a ``[variant, layer, head]`` head mask and
a ``[variant]`` vector of τ, so one batched run evaluates a whole sweep.

>>> with split_softmax(model, heads=[(15, 6), (23, 2)], span=prompt.gold, tau=0.1):  # doctest: +SKIP
...     logits = model(prompt.input_ids[None])
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from focuslens.data.render import Span
from focuslens.errors import DataError, ModelError
from focuslens.eval import check_context, evaluate_variants
from focuslens.hooks import attn_hook

__all__ = [
    "resolve_heads",
    "ROWS",
    "resolve_rows",
    "rows_mask",
    "Head",
    "HookSpec",
    "head_mask",
    "head_masks",
    "split_softmax_pattern",
    "split_softmax_hooks",
    "split_softmax",
    "split_softmax_sweep",
]

Head = tuple[int, int]
HookSpec = tuple[str, object]  # (hook name, fn(activation, hook) -> activation | None)


# ------------------------------------------------------------------ head selections
def resolve_heads(model, heads=None, ranking: Sequence[Head] | None = None, *,
                  layer: int | None = None) -> list[Head]:
    """The one reading of a head selection, used by every function that takes ``heads``.

    ``heads`` is None (every head; with ``layer``: every head of that layer), an int k (the
    top k of ``ranking``, best first: k above its length is an error, never capped),
    ``(layer, head)`` pairs (order kept, duplicates dropped) or a ``[n_layers, n_heads]``
    boolean mask. ``model`` is a bridge or an ``(n_layers, n_heads)`` shape. A head or
    layer outside the model raises :class:`~focuslens.errors.ModelError`; a selection that
    cannot be read (strings, an int without a ranking) :class:`~focuslens.errors.DataError`.
    """
    n_layers, n_heads = (model.cfg.n_layers, model.cfg.n_heads) if hasattr(model, "cfg") else tuple(model)
    if layer is not None:
        if heads is not None:
            raise DataError("pass heads= or layer=, not both.")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ModelError(f"layer={layer!r} is not a layer of this model (0..{n_layers - 1}).")
        return [(layer, h) for h in range(n_heads)]
    if heads is None:
        return [(lay, h) for lay in range(n_layers) for h in range(n_heads)]
    if isinstance(heads, Tensor) and heads.dtype == torch.bool:
        if tuple(heads.shape) != (n_layers, n_heads):
            raise ModelError(f"head mask of shape {tuple(heads.shape)} does not match {n_layers} layers × {n_heads} heads.")
        return [(int(a), int(b)) for a, b in heads.nonzero().tolist()]
    if isinstance(heads, int) and not isinstance(heads, bool):
        if ranking is None:
            raise DataError(f"heads={heads}: an int is the top k of a ranking, and none was given.")
        if not 0 < heads <= len(ranking):
            raise DataError(f"heads={heads}: the ranking has {len(ranking)} heads (k must be 1..{len(ranking)}).")
        heads = list(ranking)[:heads]
    chosen = []
    for h in heads:
        if (isinstance(h, str) or not hasattr(h, "__len__") or len(h) != 2
                or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in h)):
            raise DataError(f"heads: {h!r} is not a (layer, head) pair of ints.")
        lay, hd = int(h[0]), int(h[1])
        if not (0 <= lay < n_layers and 0 <= hd < n_heads):
            raise ModelError(f"head ({lay}, {hd}) is outside the model's {n_layers} layers × {n_heads} heads.")
        chosen.append((lay, hd))
    return list(dict.fromkeys(chosen))


def head_mask(model, heads: Iterable[Head] | Tensor | None) -> Bool[Tensor, "*variant layer head"]:
    """A ``[n_layers, n_heads]`` boolean mask of a selection (:func:`resolve_heads`; None:
    all heads); a mask passes through after a shape check."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if isinstance(heads, Tensor):
        if heads.shape[-2:] != (n_layers, n_heads):
            raise ModelError(f"head mask of shape {tuple(heads.shape)} does not match {n_layers} layers × {n_heads} heads.")
        return heads.bool()
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in resolve_heads(model, heads if heads is None else list(heads)):
        mask[layer, head] = True
    return mask


def head_masks(model, groups: Sequence[Iterable[Head]]) -> Bool[Tensor, "variant layer head"]:
    """One head mask per variant (an empty group steers nothing), for batched sweeps."""
    return torch.stack([head_mask(model, list(g)) for g in groups])


def variant_masks(model, heads) -> Bool[Tensor, "variant layer head"]:
    """``heads`` as a ``[variant, layer, head]`` mask: a ``[variant, L, H]`` mask passes
    through; one selection (pairs, an ``[L, H]`` mask or None) is a single variant."""
    mask = head_mask(model, heads if isinstance(heads, Tensor) or heads is None else list(heads))
    return mask if mask.ndim == 3 else mask[None]


def require_heads(model, heads) -> None:
    """A context manager whose heads select nothing would silently change nothing."""
    if heads is not None and not variant_masks(model, heads).any():
        raise DataError("heads selects no head: the intervention would leave the model unchanged.")


def per_variant(value, n: int, name: str) -> Float[Tensor, "variant"]:
    """``value`` as one finite float per variant (one value broadcasts)."""
    v = torch.as_tensor(value, dtype=torch.float32).flatten()
    if not torch.isfinite(v).all():
        raise DataError(f"{name}={v.tolist() if v.numel() > 1 else v.item()} must be finite: a NaN or inf "
                        f"{name} turns every steered logit into NaN.")
    if v.numel() == 1:
        v = v.expand(n)
    if v.numel() != n:
        raise DataError(f"{name} has {v.numel()} values for {n} variants (head selections).")
    return v


#: Where an intervention acts. ``"all"``: every position, as the paper does (the documents'
#: own queries are steered too, so their downstream keys change). ``"answer"``: the prompt's
#: answer rows and every position after them (generated tokens), nothing before: the
#: prompt up to the answer rows is then the unsteered model's and one prefill can serve a
#: whole sweep (:class:`~focuslens.kvcache.PrefixCache`). Explicit rows: an ``int`` (that
#: position and every later one), a :class:`Span`, or a sequence of positions. Explicit rows
#: must select at least one position of ``prompt`` when one is given, and of every forward
#: pass that starts at position 0 (no KV cache: a plain forward, generation's prefill):
#: rows all past its end raise :class:`~focuslens.errors.DataError` instead of steering
#: nothing. Later cached passes (generated tokens) may lie wholly past the prompt.
ROWS = ("all", "answer")
Rows = str | Span | int | Sequence[int] | None


def resolve_rows(rows: Rows, prompt=None) -> Span | int | Tensor | None:
    """``rows`` as absolute positions: None (every position), an int (from there on), a
    Span, or a tensor of positions. ``"answer"`` needs the ``prompt`` it refers to; with a
    ``prompt``, explicit rows must select at least one of its positions."""
    if rows is None or (isinstance(rows, str) and rows == "all"):
        return None
    if isinstance(rows, str):
        if rows != "answer":
            raise DataError(f"rows={rows!r}: use 'all', 'answer', a start position, a Span or a list of positions.")
        if prompt is None:
            raise DataError("rows='answer' needs the prompt whose answer rows it means: pass prompt=<Prompt>.")
        return int(prompt.answer.start)
    where = _explicit_rows(rows)
    if prompt is not None and not rows_reach(where, prompt.n_tokens):
        raise rows_past_end(rows, prompt.n_tokens, "prompt")
    return where


def _explicit_rows(rows) -> Span | int | Tensor:
    """A start position, a Span or a list of positions, checked (:func:`resolve_rows`)."""
    if isinstance(rows, Span):
        check_span(rows, "rows")
        return rows
    if isinstance(rows, bool) or not isinstance(rows, (int, Sequence, Tensor)):
        raise DataError(f"rows={rows!r}: use 'all', 'answer', a start position, a Span or a list of positions.")
    if isinstance(rows, int):
        if rows < 0:
            raise DataError(f"rows={rows}: a start position must be >= 0.")
        return rows
    pos = torch.as_tensor(rows, dtype=torch.long).flatten()
    if pos.numel() == 0 or (pos < 0).any():
        raise DataError(f"rows={rows!r}: give at least one position, all >= 0.")
    return pos


def check_span(span: Span, name: str) -> None:
    """A :class:`Span` argument (``name``: ``"span"`` or ``"rows"``) must be a non-empty
    range from a position >= 0 (a reversed one is refused when the Span is made)."""
    if span.end == span.start or span.start < 0:
        raise DataError(f"span {span} is empty or starts before the prompt: nothing to boost." if name == "span"
                        else f"rows={span}: a row span must be non-empty and start at a position >= 0.")


def rows_reach(where: Span | int | Tensor | None, n: int) -> bool:
    """Whether resolved rows select any of the positions ``0..n-1`` (no device sync)."""
    if where is None:
        return n > 0
    if isinstance(where, Span):
        return where.start < n
    if isinstance(where, int):
        return where < n
    return bool((where < n).any())


def rows_past_end(rows, n: int, what: str = "forward pass") -> DataError:
    """The error for explicit ``rows`` that select none of the ``n`` positions of a prompt
    or of a forward pass from position 0 (the intervention would change nothing)."""
    shown = rows.tolist() if isinstance(rows, Tensor) else rows
    return DataError(f"rows={shown!r} selects none of the {n} positions (0..{n - 1}) of the {what}: the "
                     f"intervention would leave it unchanged. Rows are absolute positions < {n}; to steer only "
                     f"the generated tokens start at the last one (rows={n - 1}), whose row predicts the first.")


def rows_mask(rows: Span | int | Tensor | None, positions: Tensor) -> Bool[Tensor, "..."]:
    """Which of the absolute ``positions`` (any shape) lie in resolved ``rows``."""
    if rows is None:
        return torch.ones_like(positions, dtype=torch.bool)
    if isinstance(rows, Span):
        return (positions >= rows.start) & (positions < rows.end)
    if isinstance(rows, int):
        return positions >= rows
    return torch.isin(positions, rows.to(positions.device))


def _check_span_arg(span) -> None:
    """``span`` of :func:`split_softmax_hooks`, checked before any forward pass."""
    if isinstance(span, Span):
        check_span(span, "span")
    elif torch.as_tensor(span).ndim not in (1, 2):
        raise DataError(f"span mask of shape {tuple(torch.as_tensor(span).shape)}: expected (n_keys,) or "
                        "(1 or batch, n_keys).")


def _span_mask(span, n_keys: int, batch: int) -> Bool[Tensor, "... key"]:
    if isinstance(span, Span):
        if span.start >= n_keys:
            raise DataError(f"span {span} starts after the {n_keys} keys of the prompt: nothing to boost.")
        mask = torch.zeros(n_keys, dtype=torch.bool)
        mask[span.start : span.end] = True
        return mask
    mask = torch.as_tensor(span).bool()
    if mask.ndim == 2 and mask.shape[0] not in (1, batch):
        rows = "1" if batch == 1 else f"1 or {batch}"
        raise DataError(f"span mask of shape {tuple(mask.shape)} for a batch of {batch}: expected "
                        f"({mask.shape[-1]},) or ({rows}, {mask.shape[-1]}): one row, or one per batch row.")
    if mask.shape[-1] < n_keys:  # a mask over the prompt; later (generated) keys are outside
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], n_keys - mask.shape[-1])], dim=-1)
    return mask[..., :n_keys]


# ------------------------------------------------------------------ the operation
def split_softmax_pattern(
    pattern: Float[Tensor, "batch head query key"],
    span: Bool[Tensor, "*batch key"],
    tau: float | Float[Tensor, "..."],
) -> Float[Tensor, "batch head query key"]:
    """Split-softmax of attention rows: the mass on ``span`` becomes ``π^τ`` (module docstring).

    ``tau`` broadcasts over ``[batch, head, query]`` (use 1 to leave a row untouched). Rows
    with no mass on the span (π = 0) or all of it (π = 1) are left unchanged. Computed in
    float32, returned in the pattern's dtype.
    """
    p = pattern.float()
    span = span.to(p.device)
    if span.ndim == 1:
        span = span[None]
    inside = span[:, None, None, :].to(p.dtype)  # [batch, 1, 1, key]
    pi = (p * inside).sum(-1)  # [batch, head, query]
    tau = torch.as_tensor(tau, dtype=p.dtype, device=p.device)
    target = pi.clamp_min(0) ** tau
    ok = (pi > 0) & (pi < 1)
    scale_in = torch.where(ok, target / pi.clamp_min(1e-30), torch.ones_like(pi))
    scale_out = torch.where(ok, (1 - target) / (1 - pi).clamp_min(1e-30), torch.ones_like(pi))
    scale = scale_out[..., None] + (scale_in - scale_out)[..., None] * inside
    return (p * scale).to(pattern.dtype)


def split_softmax_hooks(
    model,
    heads,
    span: Span | Bool[Tensor, "*batch key"],
    tau: float | Sequence[float] | Tensor,
    *,
    rows: Rows = "all",
    prompt=None,
) -> list[HookSpec]:
    """Hook specs that apply split-softmax on the chosen heads.

    Args:
        model: a ``TransformerBridge``.
        heads: ``(layer, head)`` pairs or a ``[layer, head]`` mask; or a ``[variant, layer,
            head]`` mask (:func:`head_masks`), one selection per batch row (a single
            selection broadcasts to every row).
        span: the boosted key positions: a :class:`Span`, or a boolean mask ``[key]`` or
            ``[batch, key]`` over the prompt (keys past its end are outside the span).
        tau: the exponent, one value or one per variant.
        rows: which query rows to edit (:data:`ROWS`): ``"all"`` (default, every row),
            ``"answer"`` (the answer rows of ``prompt`` and later positions), a start
            position, a :class:`Span` or a list of positions.
        prompt: the :class:`~focuslens.data.render.Prompt` that ``rows="answer"`` refers to.
    """
    where = resolve_rows(rows, prompt)
    _check_span_arg(span)
    masks = variant_masks(model, heads)
    taus = per_variant(tau, masks.shape[0], "tau")
    if (taus <= 0).any():
        raise DataError(f"tau={taus.tolist()} must be > 0 (1 is the identity, smaller boosts more).")
    hooks = []
    for layer in masks.any(0).any(-1).nonzero().flatten().tolist():
        # per variant and head: tau where the head is chosen, 1 (identity) elsewhere
        layer_tau = torch.where(masks[:, layer], taus[:, None], torch.ones(()))  # [variant, head]

        def hook(pattern, hook, layer_tau=layer_tau):
            b, _, q, k = pattern.shape
            t = layer_tau.to(pattern.device)
            if t.shape[0] not in (1, b):
                raise DataError(f"{t.shape[0]} head selections for a batch of {b}: give one, or one per row.")
            if q == k and not rows_reach(where, k):  # a pass from position 0 that no row reaches
                raise rows_past_end(rows, k)
            edit = rows_mask(where, torch.arange(k - q, k, device=pattern.device))
            t = torch.where(edit[None, None, :], t[:, :, None], torch.ones(()))  # [variant, head, query]
            return split_softmax_pattern(pattern, _span_mask(span, k, b), t)

        hooks.append((attn_hook(layer, "pattern"), hook))
    return hooks


@contextmanager
def split_softmax(
    model,
    heads,
    span: Span | Bool[Tensor, "*batch key"],
    tau: float | Sequence[float] | Tensor,
    *,
    rows: Rows = "all",
    prompt=None,
):
    """Context manager: split-softmax on ``heads`` while the block runs (forward passes and
    ``model.generate``); the hooks are removed on exit, also on error. Arguments as in
    :func:`split_softmax_hooks`; :func:`split_softmax_sweep` measures exactly this."""
    require_heads(model, heads)
    with model.hooks(fwd_hooks=split_softmax_hooks(model, heads, span, tau, rows=rows, prompt=prompt)):
        yield model


# ------------------------------------------------------------------ the sweep (paper Fig. 3)
def split_softmax_sweep(
    model,
    examples: Sequence,
    ranking: Sequence[Head],
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
    whole prompt once per variant (:func:`focuslens.eval.evaluate_variants`); ``prefills``
    (a :class:`~focuslens.kvcache.PrefillStore`) shares the prefill with other sweeps.
    Returns one row per (example, variant) with ``group`` (``"none"``, ``"contextual"``,
    ``"random"``), ``k``, ``tau``, ``draw``, the accuracy columns and ``gold_mass`` (the
    steered heads' mass on the gold document, as steered). τ = 1 is the identity, so the
    ``"none"`` variant is the baseline for every k.
    """


    check_context(model, examples)
    ranking = [(int(layer), int(head)) for layer, head in ranking]
    everyone = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    rng = random.Random(seed)
    variants = [("none", 0, 1.0, 0, [])]
    for k in ks:
        if not 0 < k <= len(ranking):
            raise DataError(f"k={k} must be in 1..{len(ranking)} (the length of the ranking).")
        top = ranking[:k]
        pool = [h for h in everyone if h not in set(top)]
        draws = [rng.sample(pool, min(k, len(pool))) for _ in range(n_random)]
        for tau in taus:
            variants.append(("contextual", k, float(tau), 0, top))
            variants += [("random", k, float(tau), d, heads) for d, heads in enumerate(draws)]
    masks = head_masks(model, [v[4] for v in variants])
    tau = torch.tensor([v[2] for v in variants])
    df = evaluate_variants(
        model, examples, len(variants),
        lambda prompt, v: split_softmax_hooks(model, masks[v], prompt.gold, tau[v], rows=rows, prompt=prompt),
        rows=rows, probe_heads=masks, return_logits=return_logits, prefills=prefills, quiet=quiet,
        desc=f"split-softmax sweep ({rows} rows)",
    )
    df, logits = df if return_logits else (df, None)
    meta = pd.DataFrame([{"group": g, "k": k, "tau": t, "draw": d} for g, k, t, d, _ in variants])
    df = df.join(meta, on="variant")
    return (df, logits) if return_logits else df
