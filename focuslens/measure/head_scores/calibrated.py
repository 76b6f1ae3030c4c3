"""The calibrated score of in-context re-ranking (ICR; Chen, Gutiérrez & Su, ICLR 2025,
"Attention in Large Language Models Yields Efficient Zero-Shot Re-Rankers"): attention
from the question's tokens to a document *minus* the same attention when the question is
content-free (``"N/A"``). The difference removes what a head gives a document whatever
is asked — its position, its length, its tokens — and keeps what the question adds.

Reproduced: the content-free-query calibration, one extra forward pass per prompt (the
same documents with the question replaced by ``"N/A"``). Adapted: ICR uses the calibrated
attention to re-rank documents (summed over all heads) and filters a few biased tokens;
here it is a per-head score of the gold document, so heads can be ranked and compared."""

from focuslens.data.render import render
from focuslens.measure.head_scores.base import HeadScore, register_pass

#: The content-free question ICR calibrates with.
CONTENT_FREE = "N/A"


@register_pass("content_free")
def content_free(model, prompt):
    """The prompt with its question replaced by the content-free ``"N/A"`` (documents,
    order and answer prefix unchanged)."""
    return render(prompt.example.replace(question=CONTENT_FREE), model.tokenizer, max_length=model.cfg.n_ctx)


class Calibrated(HeadScore):
    name = "calibrated"
    ORDER = 4
    paper = "Chen, Gutiérrez & Su 2025, ICR (ICLR 2025, arXiv 2410.02642)"
    passes = ("prompt", "content_free")
    rows = ("question",)

    def columns(self, prompt):
        return {"gold": "gold"}

    def combine(self, reading, prompt):
        return reading.column("gold", rows="question") - reading.column("gold", "content_free", rows="question")
