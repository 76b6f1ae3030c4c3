"""Lost-in-the-Middle (Liu et al., 2023) multi-document QA: load ``qa_data`` files and build
hard-negative prompts from the oracle file.

A ``qa_data`` file holds one JSON object per line (``.jsonl`` or ``.jsonl.gz``)::

    {"question": "...", "answers": ["..."],
     "ctxs": [{"title": "...", "text": "...", "hasanswer": true, "isgold": true}, ...],
     "nq_annotated_gold": {"title": "...", "chunked_long_answer": "...", ...}}

:func:`load_qa_file` turns each line into a :class:`QAExample` with the line's documents.
The oracle file (``nq-open-oracle.jsonl.gz``) holds only each question's gold passage;
:func:`make_nq_distractor_examples` adds distractors to it: the *other* questions' gold
passages that are lexically closest to the question (BM25), minus any that contain an answer.

>>> examples = load_qa_file("nq-open-oracle.jsonl.gz", limit=2)  # doctest: +SKIP
>>> examples[0].qid, examples[0].gold.title                     # doctest: +SKIP
('nq-1', 'List of Nobel laureates in Physics')
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import zlib
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from focuslens.data.examples import LITM_INSTRUCTION, Document, QAExample, normalize_answer
from focuslens.errors import DataError

__all__ = ["read_jsonl", "load_qa_file", "make_nq_distractor_examples", "oracle_lines"]

PathLike = str | Path


# ---------------------------------------------------------------- reading files
def numbered_records(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of a .jsonl[.gz] file.

    Every fault is a ``DataError`` naming the file (and the line where known): unreadable,
    truncated or corrupt gzip, not UTF-8, not JSON, not an object, or no records at all.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    n, found = 0, False
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                line = _decoded(raw, path, n)
                if line.strip():
                    found = True
                    yield n, _parsed(line, path, n)
    except (EOFError, zlib.error) as e:
        at = f"after line {n}" if n else "before line 1"
        raise DataError(f"{path}, {at}: the gzip stream is truncated or corrupt ({e}).") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not found:
        raise DataError(f"{path}: no records (the file has no non-blank lines).")


def _decoded(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}, line {n}: not UTF-8 text ({e.reason} at byte {e.start} of the line).") from None


def _parsed(line: str, path: Path, n: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}).") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {n}: expected a JSON object, got {type(record).__name__}.")
    return record


def read_jsonl(path: PathLike) -> Iterator[dict[str, Any]]:
    """Iterate the JSON objects of a ``.jsonl`` or ``.jsonl.gz`` file (blank lines skipped)."""
    for _, record in numbered_records(path):
        yield record


def _field(record: dict, name: str, kind: type, where: str) -> Any:
    """``record[name]``, checked to be a ``kind``; ``where`` says which file/line/object."""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}.")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} is a {type(value).__name__}, not a {kind.__name__}.")
    return value


def _parse_line(record: dict, where: str) -> tuple[str, tuple[str, ...], list[Document], int | None]:
    """question, answers, documents (the ctxs) and gold index of one qa_data line."""
    question = _field(record, "question", str, where)
    answers = _field(record, "answers", list, where)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: field 'answers' must be a non-empty list of strings.")
    ctxs = _field(record, "ctxs", list, where)
    docs, gold, first_hit = [], None, None
    for i, ctx in enumerate(ctxs):
        at = f"{where}, ctxs[{i}]"
        if not isinstance(ctx, dict):
            raise DataError(f"{at}: expected an object with 'title' and 'text'.")
        docs.append(Document(_field(ctx, "title", str, at), _field(ctx, "text", str, at)))
        if gold is None and ctx.get("isgold"):
            gold = i
        if first_hit is None and ctx.get("hasanswer"):
            first_hit = i
    return question, tuple(answers), docs, gold if gold is not None else first_hit


def _example(where: str, **fields: Any) -> QAExample:
    """A QAExample whose validation errors say which file and line they come from."""
    try:
        return QAExample(instruction=LITM_INSTRUCTION, **fields)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


# ---------------------------------------------------------------- loading
def load_qa_file(
    path: PathLike,
    *,
    gold_position: int | None = None,
    n_documents: int | None = None,
    limit: int | None = None,
) -> list[QAExample]:
    """Load a Lost-in-the-Middle ``qa_data`` file: one example per line.

    Args:
        path: a ``.jsonl`` or ``.jsonl.gz`` file.
        gold_position: move the gold document to this index (other documents keep their order).
        n_documents: keep only this many documents: the gold one plus the first
            ``n_documents - 1`` others, in file order (the gold is never cut off).
        limit: read only the first ``limit`` questions.

    The gold document is the ctx marked ``isgold``, else the first with ``hasanswer``, else
    there is none (``gold_index=None``). Each example has ``qid=f"nq-{line}"`` (1-based line
    number, stable across calls) and ``meta={"source", "line", "layout": "qa"}``.
    """
    if n_documents is not None and n_documents < 1:
        raise DataError(f"n_documents={n_documents} must be at least 1.")
    examples: list[QAExample] = []
    for n, record in numbered_records(path):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}, line {n}"
        question, answers, docs, gold = _parse_line(record, where)
        if n_documents is not None and len(docs) > n_documents:
            docs, gold = _truncate(docs, gold, n_documents)
        ex = _example(
            where,
            documents=docs,
            gold_index=gold,
            question=question,
            answers=answers,
            qid=f"nq-{n}",
            meta={"source": str(path), "line": n, "layout": "qa"},
        )
        if gold_position is not None:
            try:
                ex = ex.with_gold_at(gold_position)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        examples.append(ex)
    return examples


def _truncate(docs: list[Document], gold: int | None, n: int) -> tuple[list[Document], int | None]:
    if gold is None or gold < n:
        return docs[:n], gold
    return docs[: n - 1] + [docs[gold]], n - 1


# ---------------------------------------------------------------- answer matching
def _answer_pattern(normalized_answer: str) -> re.Pattern[str]:
    """Where a (SQuAD-normalised) answer counts as mentioned in a normalised passage.

    The answer must start at a word boundary ("röntgen" is in "röntgens", "red" is not in
    "hundred"); answers shorter than 3 characters must be whole words, since "s" or "7"
    would otherwise match nearly every passage ("s" starts "shaped", "7" is in "1975").
    Boundaries are regex ones, because SQuAD keeps non-ASCII punctuation ("1993–1994").
    """
    end = r"(?!\w)" if len(normalized_answer) < 3 else ""
    return re.compile(r"(?<!\w)" + re.escape(normalized_answer) + end)


# ---------------------------------------------------------------- BM25 hard negatives
_STOPWORDS = frozenset(
    """a an the of in on at to for from by with and or is are was were be been it its as
    that this these those what which who whom whose when where why how do does did
    has have had not no s""".split()
)


def bm25_terms(text: str) -> list[str]:
    return [t for t in re.findall(r"\w+", text.lower()) if t not in _STOPWORDS]


class BM25:
    """Okapi BM25 over a fixed list of token lists, as an inverted index of numpy arrays.

    A query touches only the posting lists of its own terms, so scoring every passage
    for one question costs a handful of vectorised adds.
    """

    def __init__(self, docs: Sequence[list[str]], k1: float = 0.9, b: float = 0.4):
        self.n = len(docs)
        lengths = np.array([len(d) for d in docs], dtype=np.float64)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, toks in enumerate(docs):
            for term, tf in Counter(toks).items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(tf)
        self.index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, (ids, tfs) in postings.items():
            idx, tf = np.array(ids), np.array(tfs, dtype=np.float64)
            idf = math.log(1 + (self.n - len(idx) + 0.5) / (len(idx) + 0.5))
            self.index[term] = (idx, idf * tf * (k1 + 1) / (tf + norm[idx]))

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(self.n)
        for term in set(query):
            if term in self.index:
                idx, weight = self.index[term]
                out[idx] += weight
        return out


def _oracle_gold(record: dict, docs: list[Document], gold: int | None, where: str) -> Document:
    """The gold passage: ``nq_annotated_gold`` title + chunked_long_answer, else the gold ctx."""
    annotated = record.get("nq_annotated_gold")
    if isinstance(annotated, dict) and {"title", "chunked_long_answer"} <= annotated.keys():
        return Document(annotated["title"], annotated["chunked_long_answer"])
    if gold is None:
        raise DataError(
            f"{where}: no gold passage: need field 'nq_annotated_gold' (title, chunked_long_answer) "
            "or a ctx with 'isgold' or 'hasanswer' true."
        )
    return docs[gold]


class _OracleQuestion(NamedTuple):
    """One line of the oracle file: its number, question, answers and gold passage."""

    line: int
    question: str
    answers: tuple[str, ...]
    gold: Document


def _oracle_questions(path: PathLike) -> list[_OracleQuestion]:
    """Every question of the oracle file, with its gold passage (see :func:`_oracle_gold`)."""
    questions = []
    for n, record in numbered_records(path):
        where = f"{path}, line {n}"
        question, answers, docs, gold = _parse_line(record, where)
        questions.append(_OracleQuestion(n, question, answers, _oracle_gold(record, docs, gold, where)))
    return questions


def oracle_lines(path: PathLike) -> list[int]:
    """The line number of every question of the oracle file (the ``line`` of its examples'
    ``meta`` and ``qid = nq-{line}``), in file order: what question splits are drawn from."""
    return [q.line for q in _oracle_questions(path)]


def _checked_positions(n_documents: int, gold_positions: Sequence[int]) -> tuple[int, ...]:
    """``gold_positions`` as a tuple, after checking it and ``n_documents`` make sense."""
    if n_documents < 1:
        raise DataError(f"n_documents={n_documents} must be at least 1.")
    positions = tuple(gold_positions)
    if not positions or not all(isinstance(p, int) and 0 <= p < n_documents for p in positions):
        raise DataError(
            f"gold_positions={positions} must be non-empty integers in 0..{n_documents - 1}."
        )
    return positions


class _DistractorPool:
    """The passages distractors are drawn from: each distinct gold passage once (several
    questions share a passage), the line it first appears on, its BM25 index and its
    SQuAD-normalised ``title text``."""

    def __init__(self, questions: Sequence[_OracleQuestion]):
        pool: dict[Document, int] = {}
        for q in questions:
            pool.setdefault(q.gold, q.line)
        self.passages = list(pool)
        self.lines = list(pool.values())
        self.bm25 = BM25([bm25_terms(f"{d.title} {d.text}") for d in self.passages])
        self.normalized = [normalize_answer(f"{d.title} {d.text}") for d in self.passages]

    def choose(self, q: _OracleQuestion, k: int, where: str) -> list[int]:
        """Indices of the ``k`` best-ranked passages that qualify as ``q``'s distractors:
        a new title (one passage per article), not the gold's text, no answer mentioned."""
        needles = [(a, _answer_pattern(a)) for a in map(normalize_answer, q.answers) if a]
        chosen: list[int] = []
        titles = {q.gold.title}
        for j in np.argsort(-self.bm25.scores(bm25_terms(q.question)), kind="stable"):
            if len(chosen) == k:
                break
            d, text = self.passages[j], self.normalized[j]
            if d.title in titles or d.text == q.gold.text:
                continue
            if any(a in text and p.search(text) for a, p in needles):
                continue
            chosen.append(int(j))
            titles.add(d.title)
        if len(chosen) < k:
            raise DataError(
                f"{where}: only {len(chosen)} passages qualify as distractors, "
                f"need n_documents - 1 = {k}."
            )
        return chosen


def _gold_placed_at(
    q: _OracleQuestion, distractors: list[Document], lines: list[int], pos: int, path: PathLike, seed: int
) -> QAExample:
    """The prompt for ``q`` with its gold inserted at ``pos`` among ``distractors``
    (which come from the oracle file's ``lines``)."""
    return _example(
        f"{path}, line {q.line}",
        documents=distractors[:pos] + [q.gold] + distractors[pos:],
        gold_index=pos,
        question=q.question,
        answers=q.answers,
        qid=f"nq-{q.line}",
        meta={
            "source": str(path),
            "line": q.line,
            "layout": "qa",
            "gold_position": pos,
            "seed": seed,
            "distractors": "bm25-oracle",
            "distractor_lines": list(lines),
        },
    )


def make_nq_distractor_examples(
    path: PathLike,
    *,
    n_documents: int = 20,
    gold_positions: Sequence[int] = (0, 4, 9, 14, 19),
    seed: int = 0,
    limit: int | None = None,
    lines: Collection[int] | None = None,
) -> list[QAExample]:
    """Multi-document prompts from the oracle file, with hard-negative distractors.

    For each question, every other question's gold passage is scored by BM25 against the
    question (lowercased word tokens, a small stopword list, over title + text). Passages
    with the gold's text or the title of the gold or of a better-ranked distractor, or that
    mention an accepted answer (SQuAD-normalised, see :func:`_answer_pattern`), are skipped;
    the top ``n_documents - 1`` are shuffled with a generator seeded by ``(seed, line)`` and
    the gold is inserted at each of ``gold_positions``.

    Args:
        path: the oracle ``qa_data`` file (one gold passage per question).
        n_documents: documents per prompt (gold + distractors).
        gold_positions: where to put the gold; one example per (question, position), all
            sharing the question's ``qid`` (``nq-{line}``, as in :func:`load_qa_file`).
        seed: seeds the distractor order; the distractor *set* does not depend on it.
        limit: build examples for the first ``limit`` questions only; distractors still come
            from the whole file, so a question's examples do not depend on ``limit``.
        lines: build examples only for the questions on these lines of the file
            (:func:`oracle_lines`), in file order (then ``limit``); likewise independent.

    ``meta`` records ``source``, ``line``, ``layout``, ``gold_position``, ``seed`` and
    ``distractor_lines`` (the lines whose gold passages serve as distractors, in prompt order).
    """
    positions = _checked_positions(n_documents, gold_positions)
    questions = _oracle_questions(path)
    pool = _DistractorPool(questions)
    examples: list[QAExample] = []
    if lines is not None:
        wanted = set(lines)
        unknown = wanted - {q.line for q in questions}
        if unknown:
            raise DataError(f"lines={sorted(unknown)[:5]}: {path} has no question on those lines.")
        questions = [q for q in questions if q.line in wanted]
    for q in questions[:limit]:
        chosen = pool.choose(q, n_documents - 1, f"{path}, line {q.line}")
        random.Random(f"focuslens-nq-{seed}-{q.line}").shuffle(chosen)
        distractors = [pool.passages[j] for j in chosen]
        lines = [pool.lines[j] for j in chosen]
        examples += [_gold_placed_at(q, distractors, lines, pos, path, seed) for pos in positions]
    return examples
