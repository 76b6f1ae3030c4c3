"""A contrastive head score after CoRe heads (Tran et al. 2025, "Contrastive Retrieval
Heads Improve Attention-Based Re-Ranking", arXiv 2510.02219): reward attention to the
relevant document, penalise attention to irrelevant ones, so a head that attends to every
document alike (a "reads documents" head that does not discriminate) scores zero.

Adapted: CoRe scores query→document attention on re-ranking data with a contrastive
objective; focuslens uses the simplest contrast on the same quantity, at the question's
tokens like QRHead: the gold document's mass minus the mean mass of one irrelevant
document, ``m_gold − mean_{d≠gold} m_d`` (no temperature to tune)."""

import torch

from focuslens.measure.head_scores.base import HeadScore


class Contrastive(HeadScore):
    name = "contrastive"
    ORDER = 3
    paper = "Tran et al. 2025, CoRe heads (arXiv 2510.02219)"
    rows = ("question",)

    def columns(self, prompt):
        return {f"doc_{i + 1}": f"doc_{i + 1}" for i in range(len(prompt.documents))}

    def combine(self, reading, prompt):
        docs = torch.stack([reading.column(f"doc_{i + 1}", rows="question") for i in range(len(prompt.documents))], -1)
        gold = docs[..., prompt.gold_index]
        if docs.shape[-1] == 1:
            return gold
        return gold - (docs.sum(-1) - gold) / (docs.shape[-1] - 1)
