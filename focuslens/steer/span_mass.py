"""Span-mass edits: the one engine under split-softmax, PASTA and SpotLight.

Several published interventions change a head's attention row in the same way: the mass π
the row puts on a key span S (the gold document) becomes a new value t(π), and the relative
weights *inside* S and *outside* S are kept::

    a'_j = a_j · t/π              for j in S
    a'_j = a_j · (1 − t)/(1 − π)  otherwise

They differ only in t:

=================  ======================================  ===========  =======================
intervention       new mass t(π)                           identity     paper
=================  ======================================  ===========  =======================
split-softmax      π^τ                                     τ = 1        Li et al. 2024
PASTA              π / (π + α(1 − π))                      α = 1        Zhang et al. 2024
SpotLight          max(π, ψ)                               ψ = 0        Venkateswaran et al. 2025
=================  ======================================  ===========  =======================

(PASTA adds ``log α`` to the scores of the keys outside S, which is exactly this edit;
SpotLight's per-row log-bias that lifts the span to a target share ψ is too.) Rows with
π = 0 or π = 1 are left unchanged. Because the edit is a per-row key bias
``β = log(t/π) − log((1−t)/(1−π))`` on the span's keys, the pattern-free attention path
runs it without forming a pattern (:func:`focuslens.model.attention._reweighted_heads`).

:class:`SpanMassEdit` is the base of those intervention values: a subclass names its
strength field (``STRENGTH``), its identity value and :meth:`SpanMassEdit.new_mass`; heads,
ranking, span, rows, variants, context managers and sweeps come from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from focuslens.errors import DataError
from focuslens.model.heads import HookSpec, per_variant, variant_masks
from focuslens.model.hooks import HeadEdit, attn_hook
from focuslens.model.intervention import HeadIntervention
from focuslens.model.spans import (
    check_span_arg,
    first_row,
    resolve_rows,
    resolve_span,
    rows_mask,
    rows_past_end,
    rows_reach,
    span_key_mask,
)

__all__ = ["reweight_pattern", "span_mass_hooks", "SpanMassEdit"]

NewMass = Callable[[Tensor, Tensor], Tensor]  # (pi, strength) -> the span's new mass


def reweight_pattern(
    pattern: Float[Tensor, "batch head query key"],
    span: Bool[Tensor, "*batch key"],
    new_mass: NewMass,
    strength: float | Tensor,
) -> Float[Tensor, "batch head query key"]:
    """Attention rows whose mass on ``span`` becomes ``new_mass(π, strength)`` (module
    docstring); ``strength`` broadcasts over ``[batch, head, query]``. Rows with π = 0 or 1
    are unchanged. Computed in float32, returned in the pattern's dtype."""
    p = pattern.float()
    span = span.to(p.device)
    if span.ndim == 1:
        span = span[None]
    inside = span[:, None, None, :].to(p.dtype)  # [batch, 1, 1, key]
    pi = (p * inside).sum(-1)  # [batch, head, query]
    strength = torch.as_tensor(strength, dtype=p.dtype, device=p.device)
    target = new_mass(pi.clamp(0, 1), strength).clamp(0, 1)
    ok = (pi > 0) & (pi < 1)
    scale_in = torch.where(ok, target / pi.clamp_min(1e-30), torch.ones_like(pi))
    scale_out = torch.where(ok, (1 - target) / (1 - pi).clamp_min(1e-30), torch.ones_like(pi))
    scale = scale_out[..., None] + (scale_in - scale_out)[..., None] * inside
    return (p * scale).to(pattern.dtype)


def span_mass_hooks(model, heads, span, strength, *, new_mass: NewMass, identity: float, name: str,
                    ranking=None, rows="all", prompt=None) -> list[HookSpec]:
    """Hook specs applying a span-mass edit on the chosen heads: ``heads`` any selection of
    :func:`~focuslens.model.heads.resolve_heads` (or a ``[variant, layer, head]`` mask),
    ``span`` a span name of ``prompt``, a :class:`Span` or a ``[key]`` / ``[batch, key]``
    mask, ``strength`` one value or one per variant (``name`` in errors; ``identity``
    where a head or row is not steered), ``rows`` as everywhere
    (:data:`~focuslens.model.spans.ROWS`)."""
    where = resolve_rows(rows, prompt)
    if isinstance(span, (str, tuple)):
        span = resolve_span(span, prompt)
    check_span_arg(span)
    masks = variant_masks(model, heads, ranking)
    values = per_variant(strength, masks.shape[0], name)

    def check(q: int, k: int) -> None:
        if q == k and not rows_reach(where, k):  # a pass from position 0 that no row reaches
            raise rows_past_end(rows, k)

    hooks = []
    for layer in masks.any(0).any(-1).nonzero().flatten().tolist():
        # per variant and head: the strength where the head is chosen, the identity elsewhere
        layer_s = torch.where(masks[:, layer], values[:, None], torch.full((), float(identity)))  # [variant, head]
        hooks.append((attn_hook(layer, "pattern"), _layer_edit(layer_s, masks[:, layer], span, where, check,
                                                               new_mass, identity)))
    return hooks


def _layer_edit(layer_s: Tensor, chosen: Tensor, span, where, check, new_mass: NewMass, identity: float) -> HeadEdit:
    """One layer's edit as a :class:`HeadEdit`: the same edit on a full pattern (eager path)
    and on blocks of rows of the steered heads (pattern-free path)."""

    def strengths(query_rows, heads, device):
        s = layer_s.to(device)[:, heads]
        return torch.where(rows_mask(where, query_rows)[None, None, :], s[:, :, None], torch.full((), float(identity)))

    def edit(pattern, query_rows, heads):
        """``pattern`` [batch, len(heads), rows, key] at absolute ``query_rows``."""
        b, k = pattern.shape[0], pattern.shape[-1]
        if layer_s.shape[0] not in (1, b):
            raise DataError(f"{layer_s.shape[0]} head selections for a batch of {b}: give one, or one per row.")
        return reweight_pattern(pattern, span_key_mask(span, k, b), new_mass, strengths(query_rows, heads,
                                                                                         pattern.device))

    def hook(pattern, hook):
        q, k = pattern.shape[-2:]
        check(q, k)
        return edit(pattern, torch.arange(k - q, k, device=pattern.device), slice(None))

    def target(pi, query_rows, heads):
        """The span's new mass (``pi`` [batch, len(heads), rows])."""
        return new_mass(pi.clamp(0, 1), strengths(query_rows, heads, pi.device)).clamp(0, 1)

    return HeadEdit(hook, chosen & (layer_s != identity), first_row(where), edit, check,
                    span=lambda n_key, b: span_key_mask(span, n_key, b), target=target)


class SpanMassEdit(HeadIntervention):
    """Base of the span-mass interventions (module docstring). A subclass is a dataclass
    with ``heads``, ``ranking``, ``span``, its strength field and ``rows``; it sets
    ``STRENGTH`` (the field's name), ``IDENTITY`` (the strength that changes nothing) and
    implements :meth:`new_mass` and, optionally, :meth:`check_strength`."""

    IDENTITY: ClassVar[float]

    @staticmethod
    def new_mass(pi: Tensor, strength: Tensor) -> Tensor:
        """The span's new mass for current mass ``pi`` and ``strength`` (broadcast)."""
        raise NotImplementedError

    @classmethod
    def check_strength(cls, values: Tensor) -> None:
        """Raise a DataError naming the field for strengths that are not allowed."""

    def __post_init__(self) -> None:
        name = self.STRENGTH
        self.check_strength(per_variant(getattr(self, name), torch.as_tensor(getattr(self, name)).numel(), name))

    def variant_hooks(self, model, prompt, masks: Tensor, strength: Tensor) -> list[HookSpec]:
        self.check_strength(strength)
        return span_mass_hooks(model, masks, self.span, strength, new_mass=type(self).new_mass,
                               identity=self.IDENTITY, name=self.STRENGTH, rows=self.rows, prompt=prompt)

