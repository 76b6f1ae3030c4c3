"""The contextual score (Zhu et al. 2025, §3.2): the mass the answer rows put on the gold
document, ``(1/|R|) Σ_{i∈R} Σ_{j∈gold} A_ij``. The same number as the ``gold`` metric of
:func:`~focuslens.measure.scoring.score_heads` (tested); here it sits beside the field's
other scores on the same forward pass."""

from focuslens.measure.head_scores.base import HeadScore


class Contextual(HeadScore):
    name = "contextual"
    ORDER = 0
    paper = "Zhu et al. 2025, Focus Directions (arXiv 2503.23306), §3.2"

    def columns(self, prompt):
        return {"gold": "gold"}

    def combine(self, reading, prompt):
        return reading.column("gold")
