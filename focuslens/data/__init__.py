"""Multi-document QA data: examples, exact-span rendering, and sources.

Owns: :class:`QAExample` and :class:`Document` (:mod:`.examples`), splits (:mod:`.splits`: by question, and the steering splits at the
paper's gold positions),
rendering with exact token spans (:mod:`.render`: :class:`Prompt`, :class:`Span`), and the
sources — synthetic tasks (:mod:`.synthetic`), Lost-in-the-Middle NQ (:mod:`.lost_in_the_middle`)
and key-value retrieval (:mod:`.kv_retrieval`).

May import: only the top-level helpers (errors, io, progress); it never runs a model.
"""

from focuslens.data.examples import LITM_INSTRUCTION, Document, QAExample
from focuslens.data.kv_retrieval import KV_INSTRUCTION, load_kv_file, make_kv_examples
from focuslens.data.lost_in_the_middle import load_qa_file, make_nq_distractor_examples, read_jsonl
from focuslens.data.render import Prompt, Span, render, render_user_text
from focuslens.data.splits import gold_positions, split_by_question, steering_splits
from focuslens.data.synthetic import make_synthetic_qa

__all__ = [
    "Document",
    "QAExample",
    "LITM_INSTRUCTION",
    "split_by_question",
    "steering_splits",
    "gold_positions",
    "Prompt",
    "Span",
    "render",
    "render_user_text",
    "make_synthetic_qa",
    "read_jsonl",
    "load_qa_file",
    "make_nq_distractor_examples",
    "KV_INSTRUCTION",
    "load_kv_file",
    "make_kv_examples",
]
