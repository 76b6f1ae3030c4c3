"""Examples, exact-span rendering and the synthetic task."""

from __future__ import annotations

from collections import Counter

import pytest

import focuslens as fl
from focuslens import DataError, QAExample, Span, make_synthetic_qa, render
from focuslens.data import Document, split_by_question
from focuslens.data.examples import LITM_INSTRUCTION
from focuslens.data.render import first_token_id
from focuslens.data.synthetic import CITIES
from focuslens.model.testing import tiny_tokenizer


def _example(n: int = 3, gold: int | None = 1, answers=("answer",)) -> QAExample:
    docs = tuple(Document(f"title {i}", f"text {i}") for i in range(n))
    return QAExample("instr", docs, gold, "question?", answers)


def _squeeze(s: str) -> str:
    return "".join(s.split())


# ---------------------------------------------------------------- errors name the field
def test_datamodel_errors_name_the_field():
    assert issubclass(DataError, ValueError) and issubclass(DataError, fl.FocusLensError)
    with pytest.raises(DataError, match="documents"):
        QAExample("instr", (), None, "q", ("a",))
    with pytest.raises(DataError, match=r"gold_index=3 .*3 documents"):
        _example(3, gold=3)
    with pytest.raises(DataError, match="gold_index=-1"):
        _example(3, gold=-1)
    with pytest.raises(DataError, match=r"documents\[1\]"):
        QAExample("instr", (Document("t", "x"), ("t", "x")), 0, "q", ("a",))
    with pytest.raises(DataError, match="answers"):
        _example(answers=())
    with pytest.raises(DataError, match="answers"):
        QAExample("instr", (Document("t", "x"),), 0, "q", ("  ",))
    with pytest.raises(DataError, match="question"):
        QAExample("instr", (Document("t", "x"),), 0, "  ", ("a",))
    assert _example(3, gold=None).gold is None  # no gold document is allowed


def test_render_errors_name_the_field():
    tok = tiny_tokenizer()
    ex = make_synthetic_qa(1, n_documents=5, seed=0)[0]
    with pytest.raises(DataError, match="answer_prefix"):
        render(ex, tok, response="Paris.")
    n = render(ex, tok).n_tokens
    with pytest.raises(DataError, match=rf"{n} tokens.* 10\b"):
        render(ex, tok, max_length=10)
    with pytest.raises(DataError, match=rf"{n} tokens"):
        render(ex, tok, max_length=n - 1)
    assert render(ex, tok, max_length=n).n_tokens == n  # exactly the context fits
    with pytest.raises(DataError, match="layout"):
        render(ex.replace(meta={"layout": "nope"}), tok)


@pytest.mark.parametrize("bad", ["centre", "Middle", 5, -1])
def test_bad_gold_position_raises(bad):
    with pytest.raises(DataError, match="gold_position"):
        make_synthetic_qa(2, n_documents=5, gold_position=bad)


def test_bad_synthetic_sizes_raise():
    with pytest.raises(DataError, match="n_documents=0"):
        make_synthetic_qa(1, n_documents=0)
    with pytest.raises(DataError, match=f"n_documents={len(CITIES) + 1}"):
        make_synthetic_qa(1, n_documents=len(CITIES) + 1)
    with pytest.raises(DataError, match="n_examples=0"):
        make_synthetic_qa(0)


# ---------------------------------------------------------------- exact spans
TOKENIZERS = ["tiny", pytest.param("smol", marks=pytest.mark.slow)]


@pytest.fixture(params=TOKENIZERS)
def tok(request):
    if request.param == "tiny":
        return tiny_tokenizer()
    return request.getfixturevalue("smol_tokenizer")


def _decoded(tok, prompt, span: Span) -> str:
    return tok.decode(prompt.input_ids[span.to_slice()].tolist())


def _check_decodes_to(tok, prompt, span: Span, expected: str) -> None:
    text = _decoded(tok, prompt, span)
    if tok.init_kwargs.get("name_or_path") == "focuslens-tiny-wordlevel":
        assert _squeeze(text) == _squeeze(expected)  # word-level decode puts spaces between words
    else:
        assert text.strip() == expected


@pytest.mark.parametrize("n_docs, seed", [(5, 0), (12, 1), (20, 2)])
def test_spans_cover_exactly_their_parts(tok, n_docs, seed):
    ex = make_synthetic_qa(1, n_documents=n_docs, seed=seed)[0]
    prompt = render(ex, tok)
    assert tok.unk_token_id is None or tok.unk_token_id not in prompt.input_ids.tolist()
    assert len(prompt.documents) == n_docs and prompt.gold_index == ex.gold_index

    lines = [f"Document [{i + 1}](Title: {d.title}) {d.text}" for i, d in enumerate(ex.documents)]
    for i, (span, line) in enumerate(zip(prompt.documents, lines)):
        assert prompt.span_text(span) == line, i
        _check_decodes_to(tok, prompt, span, line)
    gold_line = f"Document [{ex.gold_index + 1}](Title: {ex.gold.title}) Based in {ex.answers[0]}."
    assert prompt.gold == prompt.documents[ex.gold_index]
    assert prompt.span_text(prompt.gold) == gold_line

    expected = {
        "question": "Question: " + ex.question,
        "instruction": ex.instruction,
        "answer": ex.answer_prefix,
    }
    for name, text in expected.items():
        span = getattr(prompt, name)
        assert prompt.span_text(span) == text, name
        _check_decodes_to(tok, prompt, span, text)
    assert prompt.spans()["gold"] == prompt.gold
    assert prompt.spans()[f"doc_{n_docs}"] == prompt.documents[-1]  # numbered as the prompt does
    assert prompt.spans()[prompt.gold_name] == prompt.gold


@pytest.mark.parametrize("n_docs", [1, 7])
def test_spans_are_disjoint_ordered_and_tile_the_documents(tok, n_docs):
    ex = make_synthetic_qa(1, n_documents=n_docs, seed=3)[0]
    prompt = render(ex, tok)
    off = prompt.char_offsets
    order = [prompt.sink, prompt.instruction, *prompt.documents, prompt.question, prompt.answer]
    assert all(len(s) > 0 for s in order)
    for a, b in zip(order, order[1:]):
        assert a.end <= b.start, (a, b)
    assert prompt.sink == Span(0, 2)
    # The answer rows are the last tokens of the prompt.
    assert prompt.answer.end == prompt.n_tokens == len(off)
    assert prompt.text.endswith(ex.answer_prefix)
    # Document i+1 starts right after document i: only the newline lies between them.
    for a, b in zip(prompt.documents, prompt.documents[1:]):
        assert prompt.text[off[a.end - 1][1] : off[b.start][0]] == "\n"
        assert all(prompt.text[slice(*off[t])].strip() == "" for t in range(a.end, b.start))
    block = prompt.text[off[prompt.documents[0].start][0] : off[prompt.documents[-1].end - 1][1]]
    assert block == "\n".join(f"Document [{i + 1}](Title: {d.title}) {d.text}" for i, d in enumerate(ex.documents))


def test_answer_span_without_prefix_is_the_last_token(tok):
    ex = make_synthetic_qa(1, n_documents=5, seed=0, answer_prefix=False)[0]
    assert ex.answer_prefix is None
    prompt = render(ex, tok)
    assert prompt.answer == Span(prompt.n_tokens - 1, prompt.n_tokens)
    with_prefix = render(ex.replace(answer_prefix="The answer is"), tok)
    assert with_prefix.n_tokens > prompt.n_tokens
    assert with_prefix.input_ids[: prompt.n_tokens].tolist() == prompt.input_ids.tolist()


def test_answer_span_covers_the_response(tok):
    ex = make_synthetic_qa(1, n_documents=5, seed=0)[0]
    response = ex.answer_prefix + " Paris."
    plain = render(ex, tok)
    prompt = render(ex, tok, response=response)
    assert prompt.span_text(prompt.answer) == response
    assert prompt.answer.start == plain.answer.start  # the response starts where the prefix does
    assert prompt.answer.end == prompt.n_tokens > plain.n_tokens
    _check_decodes_to(tok, prompt, prompt.answer, response)
    assert prompt.text == plain.text + " Paris."


def test_sink_size_follows_n_sink():
    tok = tiny_tokenizer()
    ex = make_synthetic_qa(1, n_documents=2, seed=0)[0]
    assert render(ex, tok, n_sink=4).sink == Span(0, 4)
    assert render(ex, tok, n_sink=1).sink == Span(0, 1)


# ---------------------------------------------------------------- the synthetic task
def test_synthetic_is_seeded():
    a = make_synthetic_qa(6, n_documents=10, seed=0)
    assert a == make_synthetic_qa(6, n_documents=10, seed=0)
    b = make_synthetic_qa(6, n_documents=10, seed=1)
    assert all(x.documents != y.documents for x, y in zip(a, b))
    assert [ex.qid for ex in a] == [f"synthetic-0-{i}" for i in range(6)]
    assert len({ex.question for ex in a}) == 6


def test_synthetic_example_is_consistent():
    for ex in make_synthetic_qa(30, n_documents=20, seed=0):
        assert ex.instruction == LITM_INSTRUCTION and ex.n_documents == 20
        city = ex.answers[0]
        assert ex.gold.text == f"Based in {city}."
        assert ex.question == f"In which city is {ex.gold.title} based?"
        assert ex.answer_prefix == f"{ex.gold.title} is based in"
        cities = [d.text.removeprefix("Based in ").removesuffix(".") for d in ex.documents]
        assert len(set(cities)) == 20 and set(cities) <= set(CITIES)
        assert ex.candidates[0] == city and sorted(ex.candidates) == sorted(cities)
        titles = [d.title for d in ex.documents]
        assert titles.count(ex.gold.title) == 1  # the question is unambiguous
        # Confusable distractors: some share the gold company's brand, some its industry.
        brand, industry = ex.gold.title.split()
        others = [t.split() for i, t in enumerate(titles) if i != ex.gold_index]
        assert any(b == brand for b, _ in others)
        assert any(ind == industry for _, ind in others)


def test_synthetic_cities_have_distinct_tiny_first_tokens():
    tok = tiny_tokenizer()
    ids = [first_token_id(tok, c) for c in CITIES]
    assert len(set(ids)) == len(CITIES) and tok.unk_token_id not in ids


@pytest.mark.slow
def test_synthetic_cities_have_distinct_smollm2_first_tokens(smol_tokenizer):
    ids = {c: first_token_id(smol_tokenizer, c) for c in CITIES}
    assert len(set(ids.values())) == len(CITIES)
    assert smol_tokenizer.decode([ids["Paris"]]) == " Paris"
    for ex in make_synthetic_qa(20, n_documents=20, seed=0):
        assert len({ids[c] for c in ex.candidates}) == 20


@pytest.mark.parametrize("where, index", [("first", 0), ("middle", 4), ("last", 9), (7, 7), (0, 0)])
def test_synthetic_gold_position(where, index):
    examples = make_synthetic_qa(8, n_documents=10, gold_position=where, seed=5)
    assert [ex.gold_index for ex in examples] == [index] * 8
    assert all(ex.documents[index].text == f"Based in {ex.answers[0]}." for ex in examples)


def test_synthetic_random_gold_positions_spread():
    counts = Counter(ex.gold_index for ex in make_synthetic_qa(200, n_documents=5, seed=0))
    assert set(counts) == set(range(5)) and min(counts.values()) > 20


# ---------------------------------------------------------------- example transforms
def test_with_n_documents_keeps_the_gold():
    ex = make_synthetic_qa(1, n_documents=10, gold_position=6, seed=0)[0]
    gold = ex.gold
    others = [d for i, d in enumerate(ex.documents) if i != 6]
    for n, pos in [(1, 0), (3, 2), (3, 0), (10, 9), (5, None)]:
        cut = ex.with_n_documents(n, pos)
        expected_pos = min(6, n - 1) if pos is None else pos
        assert cut.n_documents == n and cut.gold == gold and cut.gold_index == expected_pos
        assert [d for i, d in enumerate(cut.documents) if i != expected_pos] == others[: n - 1]
        assert (cut.question, cut.answers, cut.qid) == (ex.question, ex.answers, ex.qid)
    with pytest.raises(DataError, match="n=0"):
        ex.with_n_documents(0)
    with pytest.raises(DataError, match="n=11"):
        ex.with_n_documents(11)
    with pytest.raises(DataError, match="gold_position=3"):
        ex.with_n_documents(3, 3)


def test_gold_only_without_gold_and_with_gold_at():
    ex = make_synthetic_qa(1, n_documents=6, gold_position=2, seed=4)[0]
    only = ex.gold_only()
    assert only.documents == (ex.gold,) and only.gold_index == 0 and only.answers == ex.answers

    rest = ex.without_gold()
    assert rest.gold_index is None and rest.n_documents == 5 and ex.gold not in rest.documents
    assert rest.documents == ex.documents[:2] + ex.documents[3:]
    assert rest.without_gold() == rest
    with pytest.raises(DataError, match="gold_index is None"):
        rest.gold_only()
    with pytest.raises(DataError, match="at least 2"):
        only.without_gold()

    for pos in range(6):
        moved = ex.with_gold_at(pos)
        assert moved.gold_index == pos and moved.gold == ex.gold and moved.n_documents == 6
        assert moved.without_gold().documents == rest.documents  # others keep their order
    with pytest.raises(DataError, match="position 6"):
        ex.with_gold_at(6)


# ---------------------------------------------------------------- splitting
def _many_questions(n_questions: int = 40) -> list[QAExample]:
    base = make_synthetic_qa(n_questions, n_documents=4, seed=9)
    # Three examples per question (gold moved): they must stay in one split.
    return [ex.with_gold_at(p) for ex in base for p in (0, 1, 3)]


def test_split_by_question_keeps_questions_together():
    examples = _many_questions(40)
    splits = split_by_question(examples, (0.5, 0.25, 0.25), seed=0)
    assert list(splits) == ["train", "validation", "test"]
    qids = {name: {ex.qid for ex in exs} for name, exs in splits.items()}
    assert not (qids["train"] & qids["validation"] or qids["train"] & qids["test"] or qids["validation"] & qids["test"])
    assert [len(q) for q in qids.values()] == [20, 10, 10]
    assert sum(len(v) for v in splits.values()) == len(examples)
    assert all(Counter(ex.qid for ex in exs) == Counter({q: 3 for q in qids[n]}) for n, exs in splits.items())


def test_split_by_question_is_seeded_and_respects_fractions():
    examples = _many_questions(40)
    a = split_by_question(examples, (0.7, 0.1, 0.2), seed=1)
    assert a == split_by_question(examples, (0.7, 0.1, 0.2), seed=1)
    b = split_by_question(examples, (0.7, 0.1, 0.2), seed=2)
    assert {ex.qid for ex in a["train"]} != {ex.qid for ex in b["train"]}
    sizes = [len({ex.qid for ex in a[k]}) for k in ("train", "validation", "test")]
    assert sizes == [28, 4, 8]
    # Examples without a qid are grouped by their question text.
    no_qid = [ex.replace(qid="") for ex in examples]
    c = split_by_question(no_qid, seed=0)
    questions = [{ex.question for ex in c[k]} for k in c]
    assert sum(len(q) for q in questions) == 40 and len(set.union(*questions)) == 40


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.6, -0.2), (0.5, 0.3, 0.3), (0.2, 0.2, 0.2)])
def test_split_by_question_bad_fractions(fractions):
    with pytest.raises(DataError, match="fractions"):
        split_by_question(_many_questions(4), fractions)


def test_a_prompt_repr_is_one_short_line():
    from conftest import get_tiny

    prompt = render(make_synthetic_qa(1, n_documents=20, seed=0)[0], get_tiny("llama", 2).tokenizer)
    text = repr(prompt)
    assert "\n" not in text and len(text) < 300  # not every input id
    assert text.startswith(f"Prompt(n_tokens={prompt.n_tokens}, documents=20, gold_index={prompt.gold_index} "
                           f"(Document [{prompt.gold_index + 1}])")
