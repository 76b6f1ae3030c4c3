"""AttnRank — reorder the documents to the model's attention basin (Yi et al., ACL 2026,
"Attention Basin: Why Contextual Position Matters in Large Language Models", arXiv
2508.05128): a model attends more to some slots of a list (typically its start and end)
whatever they hold. Measure that preference once on calibration prompts, then put the
documents a retriever ranks most relevant into the slots the model attends to most. No
hooks and no labels: only the prompt changes.

Reproduced: the positional profile from a small calibration set (the mean attention per
token on each document slot at the answer rows, over every head:
:func:`~focuslens.measure.position.position_profile` with real documents) and the
assignment of the i-th most relevant document to the i-th most attended slot. Adapted:
AttnRank reorders a retriever's ranked list; focuslens's prompts come in a fixed layout (the
gold at a chosen slot), so the relevance ranking is BM25 of each document against the
question over the prompt's own documents
(:class:`~focuslens.data.lost_in_the_middle.BM25`). On NQ, where the distractors are BM25
hard negatives, that ranking is hard; on the synthetic task the gold document shares the
question's company name and BM25 finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from focuslens.data.lost_in_the_middle import BM25, bm25_terms
from focuslens.data.render import Prompt
from focuslens.errors import DataError
from focuslens.measure.position import PositionProfile
from focuslens.model.heads import HookSpec
from focuslens.model.intervention import Intervention

__all__ = ["AttnRank", "relevance_order"]


def relevance_order(example) -> list[int]:
    """The example's documents from most to least relevant to its question, by BM25 over
    the example's own documents (ties keep prompt order)."""
    index = BM25([bm25_terms(f"{d.title} {d.text}") for d in example.documents])
    scores = index.scores(bm25_terms(example.question))
    return [int(i) for i in np.argsort(-scores, kind="stable")]


@dataclass
class AttnRank(Intervention):
    """AttnRank as a value (module docstring): every example's documents reordered so the
    BM25-most-relevant document sits in the profile's most attended slot. ``profile``: a
    :class:`~focuslens.measure.position.PositionProfile` of real documents with as many
    slots as the prompts have documents."""

    profile: PositionProfile
    rows: object = "answer"  # no hooks: one prefill serves it like any answer-row intervention

    METHOD, NEEDS_LABEL = "attnrank", False
    PAPER = "Yi et al. 2026, Attention Basin / AttnRank (ACL 2026, arXiv 2508.05128)"

    @classmethod
    def candidates(cls, context):
        if not context.calibration:
            return []
        return [({}, cls(context.profile(content_free=False)))]

    def hooks(self, model, prompt=None, variants=None) -> list[HookSpec]:
        return []

    def reorder(self, example):
        """``example`` with its documents in AttnRank's order (the gold index follows its
        document)."""
        n = example.n_documents
        if n != self.profile.n_documents:
            raise DataError(f"the profile has {self.profile.n_documents} slots, the example {n} documents: measure "
                            "the profile on prompts of the same size.")
        slots, ranked = self.profile.slot_order(), relevance_order(example)
        order = [0] * n
        for slot, doc in zip(slots, ranked):
            order[slot] = doc  # the i-th most relevant document goes to the i-th most attended slot
        gold = None if example.gold_index is None else order.index(example.gold_index)
        meta = {**example.meta, "attnrank_order": order}
        if "document_numbers" in meta:  # a document keeps the number it is shown with
            meta["document_numbers"] = [meta["document_numbers"][i] for i in order]
        return example.replace(documents=tuple(example.documents[i] for i in order), gold_index=gold, meta=meta)

    def rewrite(self, model, examples: Sequence) -> list:
        return [self.reorder(ex.example if isinstance(ex, Prompt) else ex) for ex in examples]
