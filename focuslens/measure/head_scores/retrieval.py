"""The retrieval score (Wu et al. 2024, "Retrieval Head Mechanistically Explains
Long-Context Factuality", arXiv 2404.15574): how often a head *copies* — at a step that
emits token t, the head's most-attended key lies in the relevant text and is the token t.
Averaged over the answer's tokens, a head that always points at the token it is about to
write scores 1.

Reproduced: the copy event per head and step (top-1 key inside the needle and equal to the
emitted token), divided by the answer's length. Adapted: Wu et al. decode greedily on
needle-in-a-haystack prompts and count only samples whose answer is mostly right; here
the steps are teacher-forced on the gold answer (``answers[0]`` appended to the prompt:
row i predicts token i + 1) and the "needle" is the gold document, so every prompt of
every focuslens dataset (synthetic, NQ, KV retrieval) can be scored, including those the
model answers wrongly."""

import dataclasses

import torch

from focuslens.data.render import Span
from focuslens.measure.forward import teacher_forced_ids
from focuslens.measure.head_scores.base import HeadScore, register_pass


@register_pass("forced")
def forced(model, prompt):
    """The prompt followed by its gold answer's tokens; its answer rows are the rows that
    predict those tokens (the last prompt token up to the answer's second-to-last)."""
    ids = teacher_forced_ids(model.tokenizer, prompt)
    return dataclasses.replace(prompt, input_ids=ids, answer=Span(prompt.n_tokens - 1, int(ids.shape[0]) - 1))


class Retrieval(HeadScore):
    name = "retrieval"
    ORDER = 1
    paper = "Wu et al. 2024, Retrieval Head (arXiv 2404.15574)"
    passes = ("forced",)
    top_keys = True

    def combine(self, reading, prompt):
        run = reading.inputs["forced"]
        tops = reading.top_keys[("forced", "answer")]  # [layer, head, step]: absolute key positions
        steps = torch.arange(run.answer.start, run.answer.end)
        emitted = run.input_ids[steps + 1]  # the token each step writes
        gold = prompt.gold
        inside = (tops >= gold.start) & (tops < gold.end)
        copied = run.input_ids[tops] == emitted
        return (inside & copied).float().mean(-1)
