"""Lost-in-the-Middle's prompt layouts, byte for byte, and their spans.

The expected strings are written out by hand from the templates in
``lost_in_the_middle/prompts/*.prompt`` (each read with ``.rstrip("\\n")`` and filled by
``get_qa_prompt`` / ``get_closedbook_qa_prompt`` / ``get_kv_retrieval_prompt``).
"""

from __future__ import annotations

import pytest

from focuslens import DataError, QAExample, make_synthetic_qa, render
from focuslens.data import Document
from focuslens.data.examples import LITM_INSTRUCTION
from focuslens.data.render import LAYOUTS, render_user_text, with_layout
from focuslens.model.testing import tiny_tokenizer

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."


def _qa(layout="qa", **kw):
    return QAExample(instruction=LITM_INSTRUCTION, documents=(Document("Oslo", "A city in Norway."),
                                                             Document("Bergen", "Rainy.")),
                     gold_index=1, question="Which city is rainy?", answers=("Bergen",),
                     meta={"layout": layout}, **kw)


def _kv(layout="kv"):
    return QAExample(instruction=KV_INSTRUCTION, documents=(Document("a1", "v1"), Document("b2", "v2"),
                                                           Document("c3", "v3")),
                     gold_index=1, question="b2", answers=("v2",), meta={"layout": layout})


def test_qa_layouts_are_byte_identical_to_lost_in_the_middle():
    docs = "Document [1](Title: Oslo) A city in Norway.\nDocument [2](Title: Bergen) Rainy."
    assert render_user_text(_qa("qa")) == (
        "Write a high-quality answer for the given question using only the provided search results "
        "(some of which might be irrelevant).\n\n" + docs + "\n\nQuestion: Which city is rainy?\nAnswer:")
    assert render_user_text(_qa("qa_query_aware")) == (
        "Write a high-quality answer for the given question using only the provided search results "
        "(some of which might be irrelevant).\n\nQuestion: Which city is rainy?\n\n" + docs +
        "\n\nQuestion: Which city is rainy?\nAnswer:")
    assert render_user_text(_qa("qa_random_order")) == (
        "Write a high-quality answer for the given question using only the provided search results "
        "(some of which might be irrelevant). The search results are ordered randomly.\n\n" + docs +
        "\n\nQuestion: Which city is rainy?\nAnswer:")
    assert render_user_text(_qa("closedbook")) == "Question: Which city is rainy?\nAnswer:"


def test_kv_layouts_are_byte_identical_to_lost_in_the_middle():
    records = '{"a1": "v1",\n "b2": "v2",\n "c3": "v3"}'
    assert render_user_text(_kv("kv")) == (
        KV_INSTRUCTION + '\n\nJSON data:\n' + records + '\n\nKey: "b2"\nCorresponding value:')
    assert render_user_text(_kv("kv_query_aware")) == (
        KV_INSTRUCTION + '\n\nKey: "b2"\n\nJSON data:\n' + records + '\n\nKey: "b2"\nCorresponding value:')


def test_gold_only_can_keep_the_gold_documents_number():
    ex = _qa("qa")
    assert "Document [1](Title: Bergen) Rainy." in render_user_text(ex.gold_only())
    kept = ex.gold_only(keep_number=True)
    assert "\n\nDocument [2](Title: Bergen) Rainy.\n\n" in render_user_text(kept)
    # the numbering belongs to that one document: changing the documents again drops it
    assert "document_numbers" not in kept.with_gold_at(0).meta


@pytest.mark.parametrize("layout", ["qa_query_aware", "kv_query_aware"])
def test_spans_cover_both_copies_of_the_question(layout):
    tok = tiny_tokenizer(["Norway", "rainy", "Rainy", "Bergen", "Oslo", "Extract", "value", "corresponding",
                          "specified", "key", "JSON", "object", "below", "data", "Key", "Corresponding",
                          "a1", "b2", "c3", "v1", "v2", "v3"])
    ex = _qa(layout) if layout.startswith("qa") else _kv(layout)
    prompt = render(ex, tok)
    assert len(prompt.questions) == 2 and prompt.question == prompt.questions[-1]
    want = "Question: Which city is rainy?" if layout.startswith("qa") else 'Key: "b2"'
    assert [prompt.span_text(s) for s in prompt.questions] == [want, want]
    assert prompt.questions[0].end <= prompt.documents[0].start < prompt.documents[-1].end <= prompt.question.start
    assert {"question_0", "question_1"} <= set(prompt.spans())


def test_closedbook_prompt_has_no_documents():
    tok = tiny_tokenizer(["rainy"])
    prompt = render(_qa("closedbook"), tok)
    assert prompt.documents == () and prompt.gold is None
    assert prompt.span_text(prompt.question) == "Question: Which city is rainy?"


def test_with_layout_and_its_errors():
    exs = with_layout(make_synthetic_qa(2, n_documents=3, seed=1), "qa_query_aware")
    assert all(ex.meta["layout"] == "qa_query_aware" for ex in exs)
    assert render_user_text(exs[0]).count(f"Question: {exs[0].question}") == 2
    with pytest.raises(DataError, match="layout='sideways'"):
        with_layout(exs, "sideways")
    with pytest.raises(DataError, match="cannot be written as 'kv'"):
        with_layout(exs, "kv")
    assert set(LAYOUTS) == {"qa", "qa_query_aware", "qa_random_order", "closedbook", "kv", "kv_query_aware"}


def test_answer_free_distractors_never_state_a_city():
    from focuslens.data.synthetic import CITIES

    for ex in make_synthetic_qa(20, n_documents=10, seed=3, distractors="answer_free"):
        assert ex.gold.text == f"Based in {ex.answers[0]}."
        others = [d for i, d in enumerate(ex.documents) if i != ex.gold_index]
        assert not any(c in d.text for d in others for c in CITIES)
        assert all(d.text.split()[0] in {"Founded", "Makes", "Employs"} for d in others)
        assert ex.candidates == ex.answers
    # the confusable task is unchanged by the option (same seed, same examples)
    a = make_synthetic_qa(5, n_documents=6, seed=4)
    b = make_synthetic_qa(5, n_documents=6, seed=4, distractors="confusable")
    assert a == b and all(all(d.text.startswith("Based in ") for d in ex.documents) for ex in a)
    with pytest.raises(DataError, match="distractors='none'"):
        make_synthetic_qa(1, distractors="none")
