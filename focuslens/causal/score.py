"""The causal effect of each head (attribution patching; Nanda 2023, Syed et al. 2023): the
linearised change in the clean-vs-corrupted logit difference when the head's output at the
answer rows is restored (:func:`~focuslens.causal.patching.attribution_patching`). Not an
attention mass: it is computed on counterfactual pairs (the gold document's answer swapped
for another), so it is the yardstick the attention scores are compared to.

Reproduced exactly: focuslens's attribution patching (tested against TransformerLens's
``attribution_patch``). The pairs are built from the same examples
(:func:`~focuslens.causal.patching.make_counterfactual_pairs`, synthetic-style answers
only: a DataError names any other example)."""

from focuslens.causal.patching import attribution_patching, make_counterfactual_pairs
from focuslens.measure.head_scores.base import HeadScore


class Causal(HeadScore):
    name = "causal"
    ORDER = 5
    paper = "attribution patching (Nanda 2023; Syed et al. 2023), focuslens.causal.patching"

    def compute(self, model, prompts, *, quiet=False):
        pairs = make_counterfactual_pairs(model, [p.example for p in prompts])  # one pair per prompt, in order
        return attribution_patching(model, pairs, quiet=quiet).per_example["attribution"]
