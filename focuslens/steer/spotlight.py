"""SpotLight — attention steering to a target share (Venkateswaran & Contractor 2025,
"Spotlight Your Instructions: Instruction-following with Dynamic Attention Steering",
arXiv 2505.12025): per query row, if the marked span holds less than a target share ψ of
the attention, a log-bias on its keys lifts it to ψ; rows already at or above ψ are left
alone. Unlike a fixed bias (PASTA) or a power (split-softmax), the edit adapts to each row.

A span-mass edit (:mod:`focuslens.steer.span_mass`) with new mass ``max(π, ψ)``: ψ = 0 (or
any ψ ≤ π) changes nothing. Reproduced: the per-row lift to the target proportion, exactly
(the bias is solved in closed form, not iterated). Adapted: SpotLight steers all layers'
heads toward user-marked instruction spans; here it acts on the top k heads of a ranking
toward the gold document, as the other labelled interventions do.

>>> evaluate_next_token(model, test, intervention=SpotLight(20, ranking=scores, target=0.3))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from focuslens.errors import DataError
from focuslens.steer.span_mass import SpanMassEdit

__all__ = ["SpotLight"]


def _lift(pi: Tensor, target: Tensor) -> Tensor:
    return torch.maximum(pi, target)


@dataclass
class SpotLight(SpanMassEdit):
    """SpotLight as a value: on ``heads`` (an int is the top k of ``ranking``), every row
    at ``rows`` puts at least ``target`` of its attention on ``span``. ``target`` in [0, 1)
    (0 changes nothing), one value or one per variant."""

    heads: object = 20
    ranking: object = None
    span: object = "gold"
    target: object = 0.3
    rows: object = "all"

    STRENGTH, IDENTITY = "target", 0.0
    METHOD, NEEDS_LABEL = "spotlight", True
    PAPER = "Venkateswaran & Contractor 2025, SpotLight (arXiv 2505.12025)"
    new_mass = staticmethod(_lift)

    @staticmethod
    def check_strength(values: Tensor) -> None:
        if ((values < 0) | (values >= 1)).any():
            raise DataError(f"target={values.tolist()}: the span's target share must be in [0, 1) (0 changes nothing).")

    @classmethod
    def candidates(cls, context):
        return [({"target": t}, cls(context.k, context.ranking, target=t, rows=context.rows)) for t in (0.2, 0.5, 0.8)]
