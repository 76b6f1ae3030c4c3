"""Render an example into a chat prompt and find its exact token spans.

The user turn is laid out piece by piece, so the character range of every part
(instruction, each document line, the question) is known exactly. The chat template
wraps it; the tokenizer's offset mapping turns character ranges into token ranges. No
fuzzy matching: a span is exactly the tokens whose characters fall in the part.

Every layout is byte-identical to one of Lost-in-the-Middle's prompting functions
(``QAExample.meta["layout"]`` picks it, :data:`LAYOUTS` lists them): ``"qa"``,
``"qa_query_aware"`` (the question also *before* the documents, so the documents' keys can
encode their relevance to it), ``"qa_random_order"`` (the instruction says the results are
ordered randomly), ``"closedbook"`` (the question alone), ``"kv"`` and ``"kv_query_aware"``.
Two of them:

``"qa"`` (``qa.prompt``)::

    {instruction}

    Document [1](Title: {title}) {text}
    ...

    Question: {question}
    Answer:

``"kv"`` (``kv_retrieval.prompt``)::

    Extract the value corresponding to the specified key in the JSON object below.

    JSON data:
    {"k1": "v1",
     "k2": "v2"}

    Key: "k2"
    Corresponding value:
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from focuslens.data.examples import QAExample
from focuslens.errors import DataError

__all__ = ["Span", "Prompt", "render", "render_user_text", "format_qa", "format_kv", "format_closedbook",
           "with_layout", "LAYOUTS", "answer_separator", "split_visible", "answer_lead", "first_token_id",
           "scored_tokens", "candidate_token_ids"]


@dataclass(frozen=True)
class Span:
    """A half-open range of token positions ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise DataError(f"Span({self.start}, {self.end}) ends before it starts.")

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def to_slice(self) -> slice:
        return slice(self.start, self.end)


@dataclass(frozen=True)
class Prompt:
    """A rendered example: text, token ids, and exact token spans of its parts.

    Attributes:
        text: the full prompt string (chat template applied, answer prefix appended, then
            the gold answer's whitespace lead, if any: :func:`answer_lead`).
        input_ids: token ids of ``text`` (1-D tensor).
        documents: one span per document (the whole ``Document [i](Title: …) …`` line).
        gold_index: which of ``documents`` is relevant (None if none is).
        instruction, question: spans of those parts of the user turn.
        answer: the answer rows, i.e. the query positions whose next-token predictions
            produce the answer (the answer-prefix tokens and the answer's whitespace lead,
            or the response tokens, or the last prompt token when the assistant turn is
            empty).
        sink: the first tokens of the sequence (attention sink).
        char_offsets: per-token (start, end) character offsets into ``text``.
        example: the example that was rendered.
        questions: every copy of the question (two in the query-aware layouts, the last
            one is ``question``).
    """

    text: str
    input_ids: torch.Tensor
    documents: tuple[Span, ...]
    gold_index: int | None
    instruction: Span
    question: Span
    answer: Span
    sink: Span
    char_offsets: tuple[tuple[int, int], ...] = field(repr=False)
    example: QAExample = field(repr=False)
    questions: tuple[Span, ...] = ()
    #: which tokenizer made ``input_ids`` (:func:`tokenizer_id`); "" when unknown
    tokenizer: str = field(default="", repr=False)

    def __repr__(self) -> str:
        """One line (not every token id): size, documents, the gold one as the prompt
        numbers it, the question and answer spans, the start of the text."""
        gold = "None" if self.gold_index is None else f"{self.gold_index} (Document [{self.gold_index + 1}])"
        start = self.text[:40].replace("\n", "\\n")
        return (f"Prompt(n_tokens={self.n_tokens}, documents={len(self.documents)}, gold_index={gold}, "
                f"question={self.question}, answer={self.answer}, text='{start}…')")

    @property
    def gold(self) -> Span | None:
        return None if self.gold_index is None else self.documents[self.gold_index]

    @property
    def gold_name(self) -> str | None:
        """The gold document's name in :meth:`spans` and span-mass tables, ``doc_{g+1}``."""
        return None if self.gold_index is None else f"doc_{self.gold_index + 1}"

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def span_text(self, span: Span) -> str:
        """The exact characters of ``text`` that the span's tokens cover."""
        if len(span) == 0:
            return ""
        return self.text[self.char_offsets[span.start][0] : self.char_offsets[span.end - 1][1]]

    def spans(self) -> dict[str, Span]:
        """Named spans: documents as ``doc_1`` … ``doc_n``, numbered as the prompt numbers
        them (``Document [1]`` is ``doc_1``; ``documents[i]`` is ``doc_{i+1}``), plus
        ``gold`` if any."""
        out = {"sink": self.sink, "instruction": self.instruction}
        out.update({f"doc_{i + 1}": s for i, s in enumerate(self.documents)})
        if self.gold is not None:
            out["gold"] = self.gold
        if len(self.questions) > 1:
            out.update({f"question_{i}": s for i, s in enumerate(self.questions)})
        out.update(question=self.question, answer=self.answer)
        return out


# ---------------------------------------------------------------- user-turn layouts
CharRange = tuple[int, int]
#: What a layout returns: the user text, the instruction's characters, each document's,
#: and every copy of the question (query-aware layouts state it twice).
Layout = tuple[str, CharRange, list[CharRange], list[CharRange]]

#: The sentence ``qa_ordered_randomly.prompt`` appends to the instruction.
RANDOM_ORDER_SENTENCE = " The search results are ordered randomly."


class _Writer:
    """Concatenates pieces of text and remembers where the named ones start and end."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0

    def add(self, text: str) -> CharRange:
        self.parts.append(text)
        self.pos += len(text)
        return (self.pos - len(text), self.pos)

    def text(self) -> str:
        return "".join(self.parts)


def _document_numbers(ex: QAExample) -> list[int]:
    """The number each document is shown with: 1..n, or ``meta["document_numbers"]``
    (e.g. the gold's original number in a gold-only prompt, as the paper's fork writes)."""
    numbers = ex.meta.get("document_numbers")
    if numbers is None:
        return list(range(1, ex.n_documents + 1))
    numbers = [int(n) for n in numbers]
    if len(numbers) != ex.n_documents:
        raise DataError(f"QAExample.meta['document_numbers'] has {len(numbers)} entries for {ex.n_documents} documents.")
    return numbers


def format_qa(ex: QAExample, *, query_aware: bool = False, random_order: bool = False) -> Layout:
    """Lost-in-the-Middle's ``get_qa_prompt``: ``qa.prompt``, or with ``query_aware``
    ``qa_with_query_aware_contextualization.prompt`` (the question also before the
    documents), or with ``random_order`` ``qa_ordered_randomly.prompt``."""
    if query_aware and random_order:
        raise DataError("Lost-in-the-Middle has no layout that is both query-aware and randomly ordered.")
    w = _Writer()
    instruction = w.add(ex.instruction + (RANDOM_ORDER_SENTENCE if random_order else ""))
    w.add("\n\n")
    questions = []
    if query_aware:
        questions.append(w.add(f"Question: {ex.question}"))
        w.add("\n\n")
    docs = []
    for i, (number, d) in enumerate(zip(_document_numbers(ex), ex.documents)):
        if i:
            w.add("\n")
        docs.append(w.add(f"Document [{number}](Title: {d.title}) {d.text}"))
    w.add("\n\n")
    questions.append(w.add(f"Question: {ex.question}"))
    w.add("\nAnswer:")
    return w.text(), instruction, docs, questions


def format_closedbook(ex: QAExample) -> Layout:
    """Lost-in-the-Middle ``closedbook_qa.prompt``: the question alone, no documents."""
    w = _Writer()
    question = w.add(f"Question: {ex.question}")
    w.add("\nAnswer:")
    return w.text(), (0, 0), [], [question]


def format_kv(ex: QAExample, *, query_aware: bool = False) -> Layout:
    """Lost-in-the-Middle ``get_kv_retrieval_prompt`` (documents are key=title,
    value=text), with ``query_aware`` the key also before the JSON data."""
    w = _Writer()
    instruction = w.add(ex.instruction)
    w.add("\n\n")
    questions = []
    if query_aware:
        questions.append(w.add(f'Key: "{ex.question}"'))
        w.add("\n\n")
    w.add("JSON data:\n")
    docs = []
    for i, d in enumerate(ex.documents):
        w.add("{" if i == 0 else " ")
        docs.append(w.add(f'"{d.title}": "{d.text}"'))
        w.add(",\n" if i != ex.n_documents - 1 else "}")
    w.add("\n\n")
    questions.append(w.add(f'Key: "{ex.question}"'))
    w.add("\nCorresponding value:")
    return w.text(), instruction, docs, questions


#: Layout names for ``QAExample.meta["layout"]`` → the Lost-in-the-Middle template they write.
LAYOUTS = {
    "qa": format_qa,
    "qa_query_aware": lambda ex: format_qa(ex, query_aware=True),
    "qa_random_order": lambda ex: format_qa(ex, random_order=True),
    "closedbook": format_closedbook,
    "kv": format_kv,
    "kv_query_aware": lambda ex: format_kv(ex, query_aware=True),
}


def with_layout(examples, layout: str) -> list[QAExample]:
    """The same examples rendered with another layout (e.g. ``"qa_query_aware"``);
    a ``"qa*"`` layout for a ``"kv*"`` example (or back) is refused."""
    if layout not in LAYOUTS:
        raise DataError(f"layout={layout!r} is unknown; use one of {sorted(LAYOUTS)}.")
    out = []
    for i, ex in enumerate(examples):
        family = ex.meta.get("layout", "qa").startswith("kv")
        if family != layout.startswith("kv"):
            raise DataError(f"examples[{i}] has layout {ex.meta.get('layout', 'qa')!r}: it cannot be written as {layout!r}.")
        out.append(ex.replace(meta={**ex.meta, "layout": layout}))
    return out


def render_user_text(ex: QAExample) -> str:
    """The user turn of an example, exactly as its Lost-in-the-Middle template writes it."""
    return _layout(ex)(ex)[0]


def _layout(ex: QAExample):
    name = ex.meta.get("layout", "qa")
    if name not in LAYOUTS:
        raise DataError(f"QAExample.meta['layout']={name!r} is unknown; use one of {sorted(LAYOUTS)}.")
    return LAYOUTS[name]


# ---------------------------------------------------------------- chat + tokens
def _chat_text(tokenizer, user: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return user + "\n"  # a base model without a chat template: plain continuation


def _char_to_token_span(offsets: Sequence[tuple[int, int]], c0: int, c1: int, what: str) -> Span:
    toks = [i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
    if not toks:
        raise DataError(f"the {what} covers no token (characters {c0}..{c1}).")
    return Span(toks[0], toks[-1] + 1)


def _refuse_control_tokens(tokenizer, user: str, assistant: str, instr_c, question_cs, doc_cs) -> None:
    """Data text that spells a special token (``<|im_end|>``, ``<|im_start|>``…) would be
    tokenized as the real control token and could end the user turn early: refuse it,
    naming the part, rather than change what the model reads."""
    parts = {"instruction": [instr_c], "question": list(question_cs),
             **{f"Document [{i + 1}]": [c] for i, c in enumerate(doc_cs)}}
    for token in getattr(tokenizer, "all_special_tokens", None) or []:
        if not token:
            continue
        if token in assistant:
            raise DataError(f"the answer prefix / response contains the special token {token!r}; remove it.")
        at = user.find(token)
        if at >= 0:
            where = next((name for name, ranges in parts.items() if any(a <= at < b for a, b in ranges)), "user text")
            raise DataError(f"the {where} contains the special token {token!r}: it would be read as a control "
                            f"token, not text. Remove or escape it in the data.")


def _user_turn_at(chat: str, user: str) -> int:
    """Where the user turn starts in the templated ``chat`` (it must occur exactly once)."""
    user_at = chat.find(user)
    if user_at < 0 or chat.find(user, user_at + 1) >= 0:
        raise DataError("the chat template must contain the user turn exactly once.")
    return user_at


def _assistant_turn(example: QAExample, response: str | None) -> str:
    """The assistant text to append: ``response`` (which must start with the example's
    answer prefix), else the answer prefix (or nothing)."""
    prefix = example.answer_prefix or ""
    if response is not None and not response.startswith(prefix):
        raise DataError(f"QAExample.answer_prefix={prefix!r} is not a prefix of the assistant turn "
                        f"{response[:60]!r}…; pass a response that starts with the answer prefix.")
    return prefix if response is None else response


# ---------------------------------------------------------------- the answer's first token
def answer_separator(example: QAExample) -> str:
    """What joins the assistant text and the answer: a space after an answer prefix that does
    not end in whitespace (``"… is based in" + " Paris"``), else nothing: without a prefix the
    answer opens the assistant turn right after its header's newline (``"Paris"``, which
    SmolLM2 writes as the token 'Paris', not 'ĠParis')."""
    prefix = example.answer_prefix or ""
    return " " if prefix and not prefix[-1].isspace() else ""


def split_visible(tokenizer, text: str, what: str = "answer") -> tuple[list[int], int, str]:
    """``(ids, k, lead_text)``: the token ids of ``text`` (an answer with its separator)
    tokenized alone, the index ``k`` of the first token that writes a visible character, and
    the characters of the whitespace-only tokens before it (the *lead*).

    SmolLM2 splits digits one by one, so ``" 1987"`` is ['Ġ', '1', '9', '8', '7']: ``k = 1``,
    lead ``" "``; ``" Paris"`` is the single token 'ĠParis': ``k = 0``, no lead.
    A tokenizer without whitespace tokens (the word-level test one) never has a lead.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    for k, (a, b) in enumerate(offsets):
        if text[a:b].strip():
            return list(enc["input_ids"]), k, text[: offsets[k - 1][1]] if k else ""
    raise DataError(f"the {what} {text!r} writes no visible character: it has no token to score.")


def answer_lead(tokenizer, example: QAExample) -> str:
    """The whitespace the gold answer's tokenization starts with, as it follows the answer
    prefix (``" "`` for ``" 1987"`` under SmolLM2; ``""`` for ``" Paris"``).

    :func:`render` appends it to the assistant turn (teacher-forced, inside the answer span):
    the model must write those tokens before the answer's first visible token, and that
    token, the one :func:`first_token_id` scores, is predicted only after them.
    Tokenizing ``"… based in 1987"`` gives [… 'Ġin', 'Ġ', '1', …], and ``"… based in "``
    [… 'Ġin', 'Ġ']: the prompt is the canonical tokenization of the answered text cut right
    before '1'. Scoring '1' at 'Ġin' instead would ask for "in1987"; scoring 'Ġ' there would
    count any number (or a stray space) as correct.
    """
    sep = answer_separator(example)
    return split_visible(tokenizer, sep + example.answers[0], "QAExample.answers[0]")[2]


def first_token_id(tokenizer, answer: str, *, leading_space: bool = True) -> int:
    """The id of the first *visible* token of ``answer`` as it would follow the answer
    prefix (after a space unless ``leading_space=False``), the token that one forward pass
    scores. Whitespace-only tokens before it are skipped: :func:`render` writes them into the
    prompt. SmolLM2 splits ``" 1987"`` into 'Ġ', '1', '9', '8', '7': the id of '1', not of
    the bare space 'Ġ' (top-1 'Ġ' would be "correct" whatever number, or nothing, follows)."""
    ids, k, _ = split_visible(tokenizer, (" " if leading_space else "") + answer, f"answer {answer!r}")
    return ids[k]


def scored_tokens(tokenizer, example: QAExample) -> tuple[int, dict[str, int]]:
    """The gold answer's scored token, and the token each in-prompt candidate needs at that
    same position: the one after the gold's whitespace lead in the candidate's own
    tokenization (both after :func:`answer_separator`).

    With the gold ``"1987"`` (['Ġ', '1', …], scored at '1' after a teacher-forced 'Ġ') the
    candidate ``"1992"`` needs '1' there too; ``"Paris"`` (['ĠParis']) is left out: it parts
    from the gold before the scored position, where the prompt already wrote the space.
    """
    sep = answer_separator(example)
    ids, k, _ = split_visible(tokenizer, sep + example.answers[0], "QAExample.answers[0]")
    rivals = {}
    for c in example.candidates:
        if any(c in d.text for d in example.documents):
            theirs = tokenizer(sep + c, add_special_tokens=False)["input_ids"]
            if len(theirs) > k and theirs[:k] == ids[:k]:
                rivals[c] = theirs[k]
    return ids[k], rivals


def candidate_token_ids(tokenizer, example: QAExample) -> tuple[int, list[int]]:
    """The gold answer's scored token, and the distinct other tokens the in-prompt candidates
    need at that position (the competitors of candidate accuracy; :func:`scored_tokens`).
    A candidate that shares the gold's token cannot compete and is left out."""
    gold, rivals = scored_tokens(tokenizer, example)
    return gold, sorted(set(rivals.values()) - {gold})


def _encode(tokenizer, chat: str, text: str, max_length: int | None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (no second BOS if the template wrote one),
    refused if longer than ``max_length``."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and chat.startswith(bos))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    if max_length is not None and len(ids) > max_length:
        raise DataError(
            f"the prompt has {len(ids)} tokens, more than the model's context of {max_length}; "
            "use fewer or shorter documents."
        )
    return ids, offsets


def _answer_span(offsets: Sequence[tuple[int, int]], chat_end: int, text_end: int) -> Span:
    """The assistant turn's tokens (characters ``chat_end..text_end``), which must start a new
    token; with an empty assistant turn, the last prompt token."""
    if text_end == chat_end:
        return Span(len(offsets) - 1, len(offsets))
    answer = _char_to_token_span(offsets, chat_end, text_end, "assistant turn")
    if answer.start == 0 or offsets[answer.start][0] < chat_end:
        raise DataError("the assistant turn merges with the chat template's last token.")
    return answer


def render(
    example: QAExample,
    tokenizer,
    *,
    response: str | None = None,
    n_sink: int = 2,
    max_length: int | None = None,
) -> Prompt:
    """Render ``example`` with the tokenizer's chat template and locate every span.

    Args:
        example: the example.
        tokenizer: a Hugging Face fast tokenizer (needs ``return_offsets_mapping``).
        response: optional assistant text to append (e.g. the model's own answer). If the
            example has an answer prefix, the response must start with it. Without a
            response the assistant turn is the answer prefix and the gold answer's
            whitespace lead (:func:`answer_lead`): the next token is the answer's first
            visible one.
        n_sink: how many leading tokens form the ``sink`` span (the paper uses keys 0:2).
        max_length: the model's context length; longer prompts raise ``DataError``.
    """
    user, instr_c, doc_cs, question_cs = _layout(example)(example)
    chat = _chat_text(tokenizer, user)
    user_at = _user_turn_at(chat, user)
    assistant = _assistant_turn(example, response) + (answer_lead(tokenizer, example) if response is None else "")
    _refuse_control_tokens(tokenizer, user, assistant, instr_c, question_cs, doc_cs)
    text = chat + assistant
    ids, offsets = _encode(tokenizer, chat, text, max_length)

    def span(rng: CharRange, what: str) -> Span:
        return _char_to_token_span(offsets, user_at + rng[0], user_at + rng[1], what)

    answer = _answer_span(offsets, len(chat), len(text))
    questions = tuple(span(c, "question") for c in question_cs)
    instruction = span(instr_c, "instruction") if instr_c[1] > instr_c[0] else Span(questions[0].start, questions[0].start)
    return Prompt(
        text=text,
        input_ids=torch.tensor(ids, dtype=torch.long),
        documents=tuple(span(c, f"Document [{i + 1}]") for i, c in enumerate(doc_cs)),
        gold_index=example.gold_index if doc_cs else None,
        instruction=instruction,
        question=questions[-1],
        questions=questions,
        answer=answer,
        sink=Span(0, min(n_sink, len(ids))),
        char_offsets=tuple(offsets),
        example=example,
        tokenizer=tokenizer_id(tokenizer),
    )


def tokenizer_id(tokenizer) -> str:
    """A tokenizer's identity: vocabulary size and the ids of a probe string (not its name:
    one tokenizer loaded from two places is the same); kept on the tokenizer."""
    if getattr(tokenizer, "_focuslens_id", None) is None:
        ids = tokenizer("Document [1](Title: Ünïcode 1987) The answer is", add_special_tokens=False)["input_ids"]
        tokenizer._focuslens_id = f"vocabulary {len(tokenizer)}, probe {hashlib.sha256(str(ids).encode()).hexdigest()[:12]}"
    return tokenizer._focuslens_id
