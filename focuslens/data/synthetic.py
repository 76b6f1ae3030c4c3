"""A synthetic multi-document QA task: which city is a (fictional) company based in?

A document reads ``Document [3](Title: Varnex Motors) Based in Lisbon.``

Every document states one company's headquarters city. One document answers the
question (the gold document); the others are *confusable* distractors: many share the
gold company's first name word or its industry, so the model must bind the right name to
the right city. Cities are distinct within an example and their first tokens are distinct
(for the SmolLM2 tokenizer and for the word-level test tokenizer), so one forward pass
scores the answer: the gold city's first token against the other documents' cities.

>>> from focuslens.data import make_synthetic_qa
>>> ex = make_synthetic_qa(3, n_documents=5, seed=0)[0]
>>> ex.documents[ex.gold_index].text == f"Based in {ex.answers[0]}."
True
>>> ex.answer_prefix == f"{ex.documents[ex.gold_index].title} is based in"
True
"""

from __future__ import annotations

import random
import re

from focuslens.data.examples import LITM_INSTRUCTION, Document, QAExample
from focuslens.errors import DataError

__all__ = ["make_synthetic_qa", "CITIES", "synthetic_vocabulary"]

#: Single-word cities; their leading-space first tokens are all distinct for SmolLM2.
CITIES = tuple(
    """Paris London Tokyo Berlin Madrid Rome Cairo Sydney Toronto Chicago Boston Dublin Oslo
    Vienna Prague Lisbon Athens Moscow Seoul Mumbai Delhi Lima Nairobi Istanbul Warsaw
    Budapest Stockholm Helsinki Copenhagen Amsterdam Brussels Zurich Geneva Munich Hamburg
    Milan Naples Barcelona Montreal Vancouver Denver Seattle Dallas Houston Miami Atlanta
    Phoenix Detroit Manila Singapore Shanghai Beijing Kyoto Melbourne Auckland Santiago
    Havana Tehran Baghdad Dubai Kabul Kiev Sofia Lyon Bristol Glasgow Edinburgh Leeds
    Liverpool Manchester""".split()
)

_ONSETS = "B C D F G H K L M N P R S T V Z Br Cr Dr Gr Kr Pr Tr St Sl Fl Bl".split()
_VOWELS = "a e i o u".split()
_CODAS = "n r l x s m k nd rt lt".split()
_ENDINGS = "ex on ia ar is ora ent ik um ane".split()
INDUSTRIES = tuple(
    """Motors Foods Labs Energy Robotics Textiles Pharma Airlines Mining Software Bank
    Logistics Media Optics Chemicals Marine Steel Games Insurance Telecom""".split()
)

_VERB = "is based in"


def _brand(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) + rng.choice(_ENDINGS)


def _companies(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct (brand, industry) pairs; about a third share the first one's brand,
    another third its industry (the confusable distractors)."""
    gold = (_brand(rng), rng.choice(INDUSTRIES))
    out, seen = [gold], {gold}
    while len(out) < n:
        kind = rng.random()
        brand = gold[0] if kind < 0.33 else _brand(rng)
        industry = gold[1] if 0.33 <= kind < 0.66 else rng.choice(INDUSTRIES)
        if (brand, industry) not in seen:
            seen.add((brand, industry))
            out.append((brand, industry))
    return out


def make_synthetic_qa(
    n_examples: int,
    *,
    n_documents: int = 20,
    gold_position: int | str = "random",
    seed: int = 0,
    answer_prefix: bool = True,
) -> list[QAExample]:
    """Generate seeded synthetic multi-document QA examples.

    Args:
        n_examples: how many questions.
        n_documents: documents per prompt (1 gold + n-1 distractors), at most ``len(CITIES)``.
        gold_position: an index, ``"random"``, ``"first"``, ``"middle"`` or ``"last"``.
        seed: the generator seed (the same seed gives the same examples).
        answer_prefix: open the assistant turn with ``"{company} is based in"`` so
            that the next token is the city.

    Each example's ``candidates`` are the cities of all its documents (gold first); use
    :meth:`QAExample.gold_only` or truncation (``documents[:k]``-style helpers in
    :func:`focuslens.eval.distraction_table`) for fewer documents with the same question.
    """
    if not 1 <= n_documents <= len(CITIES):
        raise DataError(f"n_documents={n_documents} must be in 1..{len(CITIES)}.")
    if n_examples < 1:
        raise DataError(f"n_examples={n_examples} must be at least 1.")
    rng = random.Random(seed)
    examples = []
    for i in range(n_examples):
        companies = _companies(rng, n_documents)
        cities = rng.sample(CITIES, n_documents)
        docs = [
            Document(title=f"{b} {ind}", text=f"Based in {city}.")
            for (b, ind), city in zip(companies, cities)
        ]
        gold_doc, distractors = docs[0], docs[1:]
        rng.shuffle(distractors)
        pos = _resolve_position(gold_position, n_documents, rng)
        docs = distractors[:pos] + [gold_doc] + distractors[pos:]
        name = gold_doc.title
        examples.append(
            QAExample(
                instruction=LITM_INSTRUCTION,
                documents=tuple(docs),
                gold_index=pos,
                question=f"In which city is {name} based?",
                answers=(cities[0],),
                answer_prefix=f"{name} {_VERB}" if answer_prefix else None,
                candidates=tuple(cities),
                qid=f"synthetic-{seed}-{i}",
                meta={"source": "synthetic", "seed": seed},
            )
        )
    return examples


def _resolve_position(gold_position: int | str, n: int, rng: random.Random) -> int:
    named = {"first": 0, "middle": (n - 1) // 2, "last": n - 1}
    if gold_position == "random":
        return rng.randrange(n)
    if isinstance(gold_position, str):
        if gold_position not in named:
            raise DataError(
                f"gold_position={gold_position!r}: use an int, 'random', 'first', 'middle' or 'last'."
            )
        return named[gold_position]
    if not 0 <= gold_position < n:
        raise DataError(f"gold_position={gold_position} is out of range for {n} documents.")
    return gold_position


def synthetic_vocabulary() -> list[str]:
    """Every word the synthetic task can produce (for the offline word-level tokenizer)."""
    brands = {o + v + c + e for o in _ONSETS for v in _VOWELS for c in _CODAS for e in _ENDINGS}
    words = set(CITIES) | set(INDUSTRIES) | brands
    text = LITM_INSTRUCTION + f" Document Title Question Answer In which city Based {_VERB} based"
    words |= set(re.findall(r"\w+|[^\w\s]+", text))
    return sorted(words)
