"""The one record type of focuslens: a multi-document QA example.

An example is an instruction, a list of documents (title, text), the index of the one
relevant ("gold") document, a question, the accepted answers and an optional answer prefix
that opens the assistant turn (``"The headquarters of Acme are in"``), so that the next
token is the answer. Everything downstream (rendering, spans, scoring, steering) reads this.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import string
from dataclasses import dataclass, field
from typing import Any

from focuslens.errors import DataError

__all__ = ["Document", "QAExample", "normalize_answer", "LITM_INSTRUCTION"]

#: The instruction of Lost-in-the-Middle's ``qa.prompt`` (also used by the synthetic task).
LITM_INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search "
    "results (some of which might be irrelevant)."
)

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


@dataclass(frozen=True)
class Document:
    """One retrieved passage, rendered as ``Document [i](Title: {title}) {text}``."""

    title: str
    text: str


@dataclass(frozen=True)
class QAExample:
    """A question with one gold document among ``len(documents)`` documents.

    Attributes:
        instruction: the task instruction that opens the user turn.
        documents: the documents in prompt order.
        gold_index: position of the relevant document in ``documents``.
        question: the question.
        answers: accepted answers (the first is the canonical one).
        answer_prefix: optional text that opens the assistant turn; its tokens are the
            "answer rows" whose next-token predictions produce the answer.
        candidates: answers the model could confuse with the gold one (e.g. the attribute
            of every document of the example); used by candidate accuracy.
        qid: question id, used to split by question.
        meta: free-form provenance (source file, seed, ...).
    """

    instruction: str
    documents: tuple[Document, ...]
    gold_index: int | None
    question: str
    answers: tuple[str, ...]
    answer_prefix: str | None = None
    candidates: tuple[str, ...] = ()
    qid: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "documents", tuple(self.documents))
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.documents:
            raise DataError("QAExample.documents is empty: give at least one Document.")
        for i, doc in enumerate(self.documents):
            if not isinstance(doc, Document):
                raise DataError(
                    f"QAExample.documents[{i}] is a {type(doc).__name__}, not a Document(title, text)."
                )
        if self.gold_index is not None and not 0 <= self.gold_index < len(self.documents):
            raise DataError(
                f"QAExample.gold_index={self.gold_index} is out of range for "
                f"{len(self.documents)} documents (valid: 0..{len(self.documents) - 1}, or None)."
            )
        if not self.answers or not all(isinstance(a, str) and a.strip() for a in self.answers):
            raise DataError("QAExample.answers must hold at least one non-empty string.")
        if not self.question.strip():
            raise DataError("QAExample.question is empty.")
        if not self.instruction.strip():
            raise DataError("QAExample.instruction is empty: the prompt opens with it (give the task, e.g. "
                            "focuslens.data.examples.LITM_INSTRUCTION).")

    def _check_types(self) -> None:
        """Wrong types are refused by name (a string of answers would become its letters)."""
        for name in ("instruction", "question"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"QAExample.{name} is a {type(getattr(self, name)).__name__}, not a str.")
        for name in ("answers", "candidates"):
            if isinstance(getattr(self, name), str):
                raise DataError(f"QAExample.{name} is a str; give a list of strings, e.g. [{getattr(self, name)!r}].")
        if self.answer_prefix is not None and not isinstance(self.answer_prefix, str):
            raise DataError(f"QAExample.answer_prefix is a {type(self.answer_prefix).__name__}, not a str or None.")
        gold = self.gold_index
        if gold is not None:
            if isinstance(gold, bool) or not isinstance(gold, numbers.Integral):
                raise DataError(f"QAExample.gold_index={gold!r} is a {type(gold).__name__}, not an int (or None).")
            object.__setattr__(self, "gold_index", int(gold))

    @property
    def n_documents(self) -> int:
        return len(self.documents)

    @property
    def gold(self) -> Document | None:
        return None if self.gold_index is None else self.documents[self.gold_index]

    def replace(self, **changes: Any) -> QAExample:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def gold_only(self, *, keep_number: bool = False) -> QAExample:
        """The same question with only the gold document (the oracle prompt). With
        ``keep_number`` the document keeps its number in the full prompt
        (``Document [g+1]``, as the paper's fork writes it) instead of ``Document [1]``."""
        if self.gold_index is None:
            raise DataError("QAExample.gold_index is None: this example has no gold document.")
        number = _numbers(self)[self.gold_index] if keep_number else 1
        return self.replace(documents=(self.documents[self.gold_index],), gold_index=0,
                            meta={**_plain_meta(self), **({"document_numbers": (number,)} if keep_number else {})})

    def without_gold(self) -> QAExample:
        """The same question with the gold document removed (needs ≥ 2 documents)."""
        if self.gold_index is None:
            return self
        if len(self.documents) < 2:
            raise DataError("QAExample.without_gold needs at least 2 documents.")
        docs = self.documents[: self.gold_index] + self.documents[self.gold_index + 1 :]
        return self.replace(documents=docs, gold_index=None, meta=_plain_meta(self))

    def with_n_documents(self, n: int, gold_position: int | None = None) -> QAExample:
        """Keep the gold document and the first ``n - 1`` others, gold at ``gold_position``
        (default: as close to its current position as ``n`` allows)."""
        if self.gold_index is None:
            raise DataError("QAExample.gold_index is None: with_n_documents needs a gold document.")
        if not 1 <= n <= len(self.documents):
            raise DataError(f"n={n} documents: choose 1..{len(self.documents)}.")
        others = [d for i, d in enumerate(self.documents) if i != self.gold_index][: n - 1]
        pos = min(self.gold_index, n - 1) if gold_position is None else gold_position
        if not 0 <= pos < n:
            raise DataError(f"gold_position={pos} is out of range for {n} documents.")
        others.insert(pos, self.documents[self.gold_index])
        return self.replace(documents=tuple(others), gold_index=pos, meta=_plain_meta(self))

    def with_gold_at(self, position: int) -> QAExample:
        """Move the gold document to ``position``, keeping the other documents' order."""
        if self.gold_index is None:
            raise DataError("QAExample.gold_index is None: there is no gold document to move.")
        if not 0 <= position < len(self.documents):
            raise DataError(
                f"gold position {position} is out of range for {len(self.documents)} documents."
            )
        others = [d for i, d in enumerate(self.documents) if i != self.gold_index]
        others.insert(position, self.documents[self.gold_index])
        return self.replace(documents=tuple(others), gold_index=position, meta=_plain_meta(self))


def _numbers(ex: QAExample) -> list[int]:
    return list(ex.meta.get("document_numbers") or range(1, ex.n_documents + 1))


def _plain_meta(ex: QAExample) -> dict[str, Any]:
    """``meta`` without a custom document numbering (it no longer fits changed documents)."""
    return {k: v for k, v in ex.meta.items() if k != "document_numbers"}


