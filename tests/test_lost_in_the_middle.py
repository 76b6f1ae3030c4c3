"""Lost-in-the-Middle qa_data loading, the qa prompt template, and BM25 hard negatives."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA, require_shared

from focuslens.data import (
    LITM_INSTRUCTION,
    Document,
    QAExample,
    load_qa_file,
    make_nq_distractor_examples,
    read_jsonl,
    render,
    render_user_text,
)
from focuslens.errors import DataError

LITM_DIR = SHARED_DATA / "lost-in-the-middle"
ORACLE = LITM_DIR / "nq-open-oracle.jsonl.gz"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _line(question: str, answers: list[str], ctxs: list[tuple[str, str, bool]]) -> dict:
    return {
        "question": question,
        "answers": answers,
        "ctxs": [{"title": t, "text": x, "hasanswer": h} for t, x, h in ctxs],
    }


_PUNCT = set(r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~""")


def _normalize(s: str) -> str:
    """SQuAD normalisation, written out again so the test does not trust the module's."""
    s = "".join(c for c in s.lower() if c not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _mentions(normalized_passage: str, answer: str) -> bool:
    """The normalised answer at a word start (a whole word if shorter than 3 characters)."""
    a = _normalize(answer)
    if not a or a not in normalized_passage:
        return False
    tail = r"(?!\w)" if len(a) < 3 else ""
    return re.search(r"(?<!\w)" + re.escape(a) + tail, normalized_passage) is not None


# ---------------------------------------------------------------- the template
def test_qa_template_is_exactly_lost_in_the_middle(tmp_path):
    expected = (
        "Write a high-quality answer for the given question using only the provided search "
        "results (some of which might be irrelevant).\n\n"
        "Document [1](Title: first doc) first doc text\n"
        "Document [2](Title: second doc) second doc text\n\n"
        "Question: test question\n"
        "Answer:"
    )
    path = _write_jsonl(
        tmp_path / "qa.jsonl",
        [_line("test question", ["x"], [("first doc", "first doc text", False), ("second doc", "second doc text", True)])],
    )
    (ex,) = load_qa_file(path)
    assert render_user_text(ex) == expected
    by_hand = QAExample(
        LITM_INSTRUCTION,
        (Document("first doc", "first doc text"), Document("second doc", "second doc text")),
        0,
        "test question",
        ("x",),
    )
    assert render_user_text(by_hand) == expected


# ---------------------------------------------------------------- load_qa_file
def test_load_qa_file_fields_gold_and_positions(tmp_path):
    rows = [
        _line("q one", ["a1"], [("t0", "x0", False), ("t1", "x1", True), ("t2", "x2", True)]),
        {**_line("q two", ["a2", "b2"], [("u0", "y0", True), ("u1", "y1", False)])},
        _line("q three", ["a3"], [("v0", "z0", False)]),
    ]
    rows[1]["ctxs"][1]["isgold"] = True  # isgold beats an earlier hasanswer
    path = _write_jsonl(tmp_path / "qa.jsonl.gz", rows)

    examples = load_qa_file(path)
    assert [ex.gold_index for ex in examples] == [1, 1, None]
    assert [ex.qid for ex in examples] == ["nq-1", "nq-2", "nq-3"]
    assert examples[1].answers == ("a2", "b2")
    assert examples[0].documents[2] == Document("t2", "x2")
    assert examples[0].instruction == LITM_INSTRUCTION and examples[0].answer_prefix is None
    assert examples[0].candidates == ()
    assert examples[2].meta == {"source": str(path), "line": 3, "layout": "qa"}
    assert [r["question"] for r in read_jsonl(str(path))] == ["q one", "q two", "q three"]

    assert len(load_qa_file(path, limit=2)) == 2
    moved = load_qa_file(path, gold_position=2, limit=1)[0]
    assert [d.title for d in moved.documents] == ["t0", "t2", "t1"] and moved.gold_index == 2

    # Truncation never drops the gold: it keeps the gold plus the first n-1 others.
    cut = load_qa_file(path, n_documents=1, limit=2)
    assert [ex.documents for ex in cut] == [(Document("t1", "x1"),), (Document("u1", "y1"),)]
    assert [ex.gold_index for ex in cut] == [0, 0]


def test_load_qa_file_skips_blank_lines_but_keeps_line_numbers(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n" + json.dumps(_line("q", ["a"], [("t", "x", True)])) + "\n\n")
    (ex,) = load_qa_file(path)
    assert ex.qid == "nq-2" and ex.meta["line"] == 2


@pytest.mark.parametrize(
    "break_line, field",
    [
        (lambda r: r.pop("question"), "question"),
        (lambda r: r.pop("answers"), "answers"),
        (lambda r: r.pop("ctxs"), "ctxs"),
        (lambda r: r["ctxs"][1].pop("title"), "title"),
        (lambda r: r["ctxs"][0].pop("text"), "text"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, break_line, field):
    good = _line("q", ["a"], [("t0", "x0", True), ("t1", "x1", False)])
    bad = json.loads(json.dumps(good))
    break_line(bad)
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(DataError) as err:
        load_qa_file(path)
    message = str(err.value)
    assert f"'{field}'" in message and "line 3" in message and "bad.jsonl" in message


def test_invalid_json_and_empty_answers_name_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_line("q", ["a"], [("t", "x", True)])) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2"):
        load_qa_file(path)
    path = _write_jsonl(tmp_path / "empty.jsonl", [_line("q", [""], [("t", "x", True)])])
    with pytest.raises(DataError, match="line 1.*answers"):
        load_qa_file(path)


# ---------------------------------------------------------------- hard negatives
def test_distractors_rank_lexically_and_skip_answers(tmp_path):
    def gold(title: str, text: str) -> dict:
        return {"title": title, "text": text, "hasanswer": True, "isgold": True}

    rows = [
        {"question": "who painted the mona lisa", "answers": ["Leonardo da Vinci"],
         "ctxs": [gold("Mona Lisa", "The Mona Lisa is a portrait by Leonardo da Vinci.")]},
        {"question": "where is the mona lisa kept", "answers": ["the Louvre"],
         "ctxs": [gold("Louvre", "The Louvre in Paris keeps the Mona Lisa behind glass.")]},
        {"question": "who designed the vitruvian man", "answers": ["Leonardo"],
         "ctxs": [gold("Vitruvian Man", "A drawing, not painted, by Leonardo da Vinci.")]},
        {"question": "how far is the moon", "answers": ["384,400 km"],
         "ctxs": [gold("Moon", "The Moon is 384,400 km from Earth on average.")]},
    ]
    path = _write_jsonl(tmp_path / "oracle.jsonl", rows)
    top1 = make_nq_distractor_examples(path, n_documents=2, gold_positions=(0,))
    assert [e.documents[1].title for e in top1[:2]] == ["Louvre", "Mona Lisa"]

    ex = make_nq_distractor_examples(path, n_documents=3, gold_positions=(0, 2))
    assert len(ex) == 8 and [e.gold_index for e in ex[:2]] == [0, 2]
    # Q1: "Louvre" shares "mona lisa"; "Vitruvian Man" shares "painted" but names the
    # answer, so it is skipped for the unrelated "Moon".
    assert {d.title for d in ex[0].documents} == {"Mona Lisa", "Louvre", "Moon"}
    assert ex[0].documents[0] == Document("Mona Lisa", rows[0]["ctxs"][0]["text"])
    assert ex[0].documents[1:] == ex[1].documents[:2]  # same distractor order at every position
    assert set(ex[0].meta["distractor_lines"]) == {2, 4}
    assert all(e.qid == "nq-1" for e in ex[:2]) and ex[2].qid == "nq-2"
    with pytest.raises(DataError, match="distractors"):
        make_nq_distractor_examples(path, n_documents=4, gold_positions=(0,))
    with pytest.raises(DataError, match="gold_positions"):
        make_nq_distractor_examples(path, n_documents=3, gold_positions=(3,))


@pytest.fixture(scope="module")
def oracle():
    """The real NQ oracle file (:func:`conftest.require_shared`: a skip without it, a failure in CI)."""
    return require_shared(ORACLE)


needs_oracle = pytest.mark.usefixtures("oracle")


@pytest.fixture(scope="module")
def hard_negatives(oracle):
    return make_nq_distractor_examples(oracle, seed=0)


@needs_oracle
def test_real_oracle_file_loads():
    examples = load_qa_file(ORACLE)
    assert len(examples) == 2655
    assert len({ex.qid for ex in examples}) == 2655
    assert all(ex.n_documents == 1 and ex.gold_index == 0 for ex in examples)
    assert examples[0].question == "who got the first nobel prize in physics"
    assert examples[0].answers == ("Wilhelm Conrad Röntgen",)


@needs_oracle
def test_real_hard_negatives(hard_negatives):
    positions = (0, 4, 9, 14, 19)
    assert len(hard_negatives) == 2655 * len(positions)
    normalized = {}  # Document -> normalised "title text" (each passage recurs often)
    for i in range(0, len(hard_negatives), len(positions)):
        group = hard_negatives[i : i + len(positions)]
        assert len({e.qid for e in group}) == 1
        assert [e.gold_index for e in group] == list(positions)
        assert all(e.meta["gold_position"] == e.gold_index for e in group)
        assert all(e.n_documents == 20 and e.gold == group[0].gold for e in group)
        distractors = group[0].without_gold().documents
        assert all(e.without_gold().documents == distractors for e in group)
        assert len({d.title for d in distractors} | {group[0].gold.title}) == 20
        for d in distractors:
            if d not in normalized:
                normalized[d] = _normalize(f"{d.title} {d.text}")
            assert not any(_mentions(normalized[d], a) for a in group[0].answers), (group[0].qid, d.title)
    first = hard_negatives[0]
    assert first.gold == Document("List of Nobel laureates in Physics", first.gold.text)
    assert "Wilhelm Conrad Röntgen" in first.gold.text


@needs_oracle
def test_real_hard_negatives_are_seeded_and_independent_of_limit(hard_negatives):
    again = make_nq_distractor_examples(ORACLE, seed=0, limit=40)
    assert [e.documents for e in again] == [e.documents for e in hard_negatives[:200]]
    other = make_nq_distractor_examples(ORACLE, seed=1, limit=40)
    assert [e.documents for e in other] != [e.documents for e in again]
    # The seed reorders the distractors; which passages are chosen does not depend on it.
    assert all(set(a.documents) == set(b.documents) for a, b in zip(again, other))
    assert other[0].meta["seed"] == 1


# ---------------------------------------------------------------- spans
@needs_oracle
def test_rendered_gold_span_is_the_document_line(hard_negatives, smol_tokenizer):
    for ex in hard_negatives[5:10]:  # question 2, gold at 0, 4, 9, 14, 19
        prompt = render(ex, smol_tokenizer)
        i = ex.gold_index
        assert prompt.span_text(prompt.gold) == f"Document [{i + 1}](Title: {ex.gold.title}) {ex.gold.text}"
        assert prompt.span_text(prompt.question) == f"Question: {ex.question}"
