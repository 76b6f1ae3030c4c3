"""The query-focused retrieval score (QRHead; Zhang et al., EMNLP 2025, "Query-Focused
Retrieval Heads Improve Long-Context Reasoning and Re-ranking"): the attention mass the
*question's* tokens put on the relevant document, averaged over the question tokens. It
needs no answer: a head that reads the relevant document while the model reads the
question.

Reproduced: the query→document mass per head, ranked. Adapted: QRHead sums over the
query span of its own prompt template and aggregates over a handful of long-context QA
examples; here the question is the Lost-in-the-Middle layout's question after the
documents (the last copy in query-aware layouts) and the examples are focuslens's."""

from focuslens.measure.head_scores.base import HeadScore


class QueryFocused(HeadScore):
    name = "query_focused"
    ORDER = 2
    paper = "Zhang et al. 2025, QRHead (EMNLP 2025)"
    rows = ("question",)

    def columns(self, prompt):
        return {"gold": "gold"}

    def combine(self, reading, prompt):
        return reading.column("gold", rows="question")
