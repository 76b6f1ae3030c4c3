"""PASTA — post-hoc attention steering (Zhang et al., ICLR 2024, "Tell Your Model Where to
Attend", arXiv 2311.02262): on chosen heads, the attention to every token *outside* the
emphasised span is multiplied by α (default 0.01) before renormalising, i.e. ``log α`` is
added to those keys' scores.

That is a span-mass edit (:mod:`focuslens.steer.span_mass`): the span's mass π becomes
``π / (π + α(1 − π))`` with the relative weights inside and outside kept; α = 1 is the
identity, α → 0 puts every row's mass on the span.

Reproduced exactly: the scaling of the non-span attention on the chosen heads at every row
(PASTA's ``scale_position="exclude"``, the default). Adapted: PASTA chooses its heads by
*profiling* each head alone on ~1000 task examples; here the heads are the top k of a
ranking (any of :mod:`focuslens.measure.head_scores`), like split-softmax's, and the span is
the gold document — so it needs the label, like split-softmax.

>>> evaluate_next_token(model, test, intervention=Pasta(20, ranking=scores, alpha=0.01)).correct.mean()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from focuslens.errors import DataError
from focuslens.steer.span_mass import SpanMassEdit

__all__ = ["Pasta"]


def _pasta_mass(pi: Tensor, alpha: Tensor) -> Tensor:
    return pi / (pi + alpha * (1 - pi)).clamp_min(1e-30)


@dataclass
class Pasta(SpanMassEdit):
    """PASTA as a value: on ``heads`` (an int is the top k of ``ranking``), the attention
    outside ``span`` is scaled by ``alpha`` at ``rows``. ``alpha`` in (0, 1] (1 changes
    nothing), one value or one per variant."""

    heads: object = 20
    ranking: object = None
    span: object = "gold"
    alpha: object = 0.01
    rows: object = "all"

    STRENGTH, IDENTITY = "alpha", 1.0
    METHOD, NEEDS_LABEL = "pasta", True
    PAPER = "Zhang et al. 2024, PASTA (ICLR 2024, arXiv 2311.02262)"
    new_mass = staticmethod(_pasta_mass)

    @staticmethod
    def check_strength(values: Tensor) -> None:
        if ((values <= 0) | (values > 1)).any():
            raise DataError(f"alpha={values.tolist()}: PASTA scales the other tokens' attention by alpha in (0, 1] "
                            "(1 changes nothing, 0.01 is the paper's default).")

    @classmethod
    def candidates(cls, context):
        return [({"alpha": a}, cls(context.k, context.ranking, alpha=a, rows=context.rows)) for a in (0.5, 0.1, 0.01)]
