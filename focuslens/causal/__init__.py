"""Causal tests of heads: does a head's output at the answer rows change the answer?

Owns: the patching engine (:mod:`.engine`: one loop that replaces chosen heads' ``z`` at the
answer rows, on a shared prefix), activation and attribution patching on counterfactual
pairs (:mod:`.patching`), group ablation (:mod:`.ablation`) and the causal effect as a head
score beside the field's attention scores (:mod:`.score`, registered in
:data:`focuslens.measure.head_scores.SCORES` as ``"causal"``).

May import: :mod:`focuslens.data`, :mod:`focuslens.model`, :mod:`focuslens.measure` and
the top-level helpers.
"""

from focuslens.causal.ablation import Ablate, ablate_head_groups, ablate_heads
from focuslens.causal.patching import (
    CounterfactualPair,
    PatchingResult,
    make_counterfactual_pairs,
    patch_heads,
    rank_agreement,
)
from focuslens.causal.score import Causal

__all__ = ["Ablate", "patch_heads", "PatchingResult", "CounterfactualPair", "make_counterfactual_pairs", "ablate_heads",
           "ablate_head_groups", "rank_agreement", "Causal"]
