"""Interventions as values: what to change in a forward pass, separate from where it runs.

An :class:`Intervention` (split-softmax, focus directions, head ablation, …) holds its
settings — heads, the ranking an int refers to, spans by name, strength — and turns them
into TransformerLens hook specs for one prompt with :meth:`Intervention.hooks`. The same
value then works

* as a context manager on a model: ``with iv.on(model, prompt): model(...)`` (hooks are
  removed on exit, also on error; ``model.generate`` works inside);
* in every evaluation: ``evaluate_next_token(model, examples, intervention=iv)``,
  ``evaluate_generation(..., intervention=iv)``; and
* in every sweep, whose variants are one batched intervention (per-variant head masks and
  strengths, one batch row each).

Because spans are names (``"gold"``, ``"doc_3"``) resolved per prompt, one value serves a
whole list of prompts. This is the pyvene / nnsight idea of interventions as values,
expressed through TransformerLens hook points (no forked modeling code).

``rows`` says which query positions are edited, with one default everywhere: ``"all"``,
the paper's intervention (every position, so the documents' own queries are steered and
their downstream keys change). ``"answer"`` edits the answer rows and later positions only:
the prompt before them is then the unsteered model's, so one prefill can serve every
variant of a sweep (:class:`~focuslens.model.prefix.PrefixCache`) — faster, but a different
intervention, so it is never chosen silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import ClassVar

from torch import Tensor

from focuslens.errors import DataError
from focuslens.model.heads import HookSpec, per_variant, require_heads, variant_masks

__all__ = ["Intervention", "HeadIntervention", "Combined", "METHODS"]

#: The field's interventions compared by ``focuslens experiment methods``: name -> class,
#: filled as the modules of :mod:`focuslens.steer` are imported (a class with ``METHOD``).
METHODS: dict[str, type[Intervention]] = {}


class Intervention:
    """Base of the intervention values. A subclass sets ``rows`` and implements
    :meth:`hooks` and :meth:`n_variants`.

    A class that sets ``METHOD`` (a name) joins :data:`METHODS`, the methods comparison; it
    also sets ``NEEDS_LABEL`` (whether it must know the gold document at inference),
    ``PAPER`` (the citation) and implements :meth:`candidates`. An intervention that edits
    the prompt itself (document order) rather than the forward pass overrides
    :meth:`rewrite`, which every evaluation applies before rendering."""

    rows = "all"
    METHOD: ClassVar[str | None] = None
    NEEDS_LABEL: ClassVar[bool] = False
    PAPER: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if vars(cls).get("METHOD"):
            if cls.METHOD in METHODS and METHODS[cls.METHOD].__qualname__ != cls.__qualname__:
                raise DataError(f"two interventions are named {cls.METHOD!r}: {METHODS[cls.METHOD]} and {cls}.")
            METHODS[cls.METHOD] = cls

    @classmethod
    def candidates(cls, context) -> list[tuple[dict, Intervention]]:
        """The settings a comparison tries on validation, as ``(setting, value)`` pairs
        (``setting``: the knobs, e.g. ``{"alpha": 0.1}``, for tables), built from a
        :class:`~focuslens.steer.context.MethodContext`."""
        raise NotImplementedError(f"{cls.__name__} has no candidate settings for a methods comparison.")

    def rewrite(self, model, examples: Sequence) -> list:
        """The examples as this intervention presents them to the model (default: as they
        are). Evaluations call it before rendering."""
        return list(examples)

    def hooks(self, model, prompt=None, variants: slice | None = None) -> list[HookSpec]:
        """Hook specs for ``prompt`` (needed for span names and ``rows="answer"``); with
        ``variants``, only those variants, one batch row each."""
        raise NotImplementedError

    def n_variants(self, model) -> int:
        """How many variants (batch rows) this value holds: 1 unless built for a sweep."""
        return 1

    @contextmanager
    def on(self, model, prompt=None):
        """Context manager: the intervention is active on ``model`` while the block runs."""
        with model.hooks(fwd_hooks=self.hooks(model, prompt)):
            yield model

    def hooks_for(self, model):
        """``(prompt, variants) -> hook specs``: the form the variant engine calls."""
        return lambda prompt, variants: self.hooks(model, prompt, variants)


class HeadIntervention(Intervention):
    """An intervention on chosen heads with one strength per variant (τ, α, a scale, …).

    A subclass is a dataclass with ``heads``, ``ranking`` and its strength field (named by
    ``STRENGTH``) and implements :meth:`variant_hooks`; this base reads the selection (any
    form of :func:`~focuslens.model.heads.resolve_heads`, or a ``[variant, layer, head]``
    mask), refuses one that selects nothing, and slices the variants a batch runs.
    """

    STRENGTH: ClassVar[str]

    def ranking_for(self, model):
        """The ranking an int ``heads`` refers to (a subclass may supply a default)."""
        return self.ranking

    def head_masks(self, model) -> Tensor:
        """``[variant, layer, head]`` masks of the selection."""
        masks = variant_masks(model, self.heads, self.ranking_for(model))
        require_heads(masks)
        return masks

    def n_variants(self, model) -> int:
        return int(self.head_masks(model).shape[0])

    def hooks(self, model, prompt=None, variants: slice | None = None) -> list[HookSpec]:
        masks = self.head_masks(model)
        strength = per_variant(getattr(self, self.STRENGTH), masks.shape[0], self.STRENGTH)
        if variants is not None:
            masks, strength = masks[variants], strength[variants]
        return self.variant_hooks(model, prompt, masks, strength)

    def variant_hooks(self, model, prompt, masks: Tensor, strength: Tensor) -> list[HookSpec]:
        """Hook specs for ``masks`` ``[variant, layer, head]`` and one strength per variant."""
        raise NotImplementedError


class Combined(Intervention):
    """Several interventions acting together, variant by variant: batch row *v* gets every
    part's variant *v* (so each part holds the same number of variants). A part that should
    leave a row alone gives it no heads (or α = 0, τ = 1). This lets one batched pass carry
    different interventions side by side — e.g. focus directions, random directions and
    split-softmax as the rows of one prefix-sharing run — with exactly the hooks each would
    install alone (their hook points compose).

    >>> Combined(Focus(dirs, alphas, masks, rows="answer"), SplitSoftmax(masks2, tau=taus, rows="answer"))  # doctest: +SKIP
    """

    def __init__(self, *parts: Intervention):
        if not parts:
            raise DataError("Combined needs at least one intervention.")
        rows = {str(p.rows) for p in parts}
        if len(rows) != 1:
            raise DataError(f"Combined parts act at different rows ({sorted(rows)}): give them all the same rows.")
        self.parts, self.rows = tuple(parts), parts[0].rows

    def n_variants(self, model) -> int:
        counts = [p.n_variants(model) for p in self.parts]
        if len(set(counts)) != 1:
            raise DataError(f"Combined parts hold {counts} variants: each must hold the same number.")
        return counts[0]

    def hooks(self, model, prompt=None, variants: slice | None = None) -> list[HookSpec]:
        self.n_variants(model)
        return [hook for part in self.parts for hook in part.hooks(model, prompt, variants)]
