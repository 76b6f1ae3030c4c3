"""A synthetic multi-document QA task: which city is a (fictional) company based in?

A document reads ``Document [3](Title: Varnex Motors) Based in Lisbon.``

One document answers the question (the gold document). Two kinds of distractors:

* ``"confusable"`` (default): every document states one company's headquarters city, and
  many share the gold company's first name word or its industry, so the model must bind
  the right name to the right city. No bias that ignores the question can pick the gold
  document out of these.
* ``"answer_free"``: the other documents are about other companies and state other
  attributes (``Founded in 1987.``, ``Makes bicycles.``, ``Employs 450 people.``), never a
  city, as in the paper's NQ data (retrieved passages without the answer). Moving
  attention from the attention sink onto the context can help here by itself.
 Cities are distinct within an example and their first tokens are distinct
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

__all__ = ["make_synthetic_qa", "CITIES", "DISTRACTORS", "synthetic_vocabulary"]

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
_PRODUCTS = "bicycles toys paint boats lamps shoes clocks tiles pumps cables".split()
_YEARS = tuple(range(1950, 2016))
_STAFF = (120, 250, 450, 800, 1200, 3000, 5000, 9000)
DISTRACTORS = ("confusable", "answer_free")


def _answer_free_text(rng: random.Random) -> str:
    """A distractor's text: an attribute that is not a city."""
    kind = rng.randrange(3)
    if kind == 0:
        return f"Founded in {rng.choice(_YEARS)}."
    if kind == 1:
        return f"Makes {rng.choice(_PRODUCTS)}."
    return f"Employs {rng.choice(_STAFF)} people."


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
    distractors: str = "confusable",
) -> list[QAExample]:
    """Generate seeded synthetic multi-document QA examples.

    Args:
        n_examples: how many questions.
        n_documents: documents per prompt (1 gold + n-1 distractors), at most ``len(CITIES)``.
        gold_position: an index, ``"random"``, ``"first"``, ``"middle"`` or ``"last"``.
        seed: the generator seed (the same seed gives the same examples).
        answer_prefix: open the assistant turn with ``"{company} is based in"`` so
            that the next token is the city.
        distractors: ``"confusable"`` (other companies' cities) or ``"answer_free"``
            (other companies' other attributes, no city): module docstring.

    Each example's ``candidates`` are the cities of all its documents (gold first); use
    :meth:`QAExample.gold_only` or truncation (``documents[:k]``-style helpers in
    :func:`focuslens.measure.distraction.distraction`) for fewer documents with the same question.
    """
    count("n_examples", n_examples)
    if count("n_documents", n_documents) > len(CITIES):
        raise DataError(f"n_documents={n_documents} must be in 1..{len(CITIES)}.")
    if distractors not in DISTRACTORS:
        raise DataError(f"distractors={distractors!r}: use one of {DISTRACTORS}.")
    rng = random.Random(seed)
    examples = []
    for i in range(n_examples):
        companies = _companies(rng, n_documents)
        cities = rng.sample(CITIES, n_documents)
        docs = [
            Document(title=f"{b} {ind}", text=f"Based in {city}." if j == 0 or distractors == "confusable"
                     else _answer_free_text(rng))
            for j, ((b, ind), city) in enumerate(zip(companies, cities))
        ]
        gold_doc, others = docs[0], docs[1:]
        rng.shuffle(others)
        pos = resolve_position(gold_position, n_documents, rng)
        docs = others[:pos] + [gold_doc] + others[pos:]
        name = gold_doc.title
        examples.append(
            QAExample(
                instruction=LITM_INSTRUCTION,
                documents=tuple(docs),
                gold_index=pos,
                question=f"In which city is {name} based?",
                answers=(cities[0],),
                answer_prefix=f"{name} {_VERB}" if answer_prefix else None,
                candidates=tuple(cities) if distractors == "confusable" else (cities[0],),
                qid=f"synthetic-{seed}-{i}" + ("" if distractors == "confusable" else "-af"),
                meta={"source": "synthetic", "seed": seed, "distractors": distractors},
            )
        )
    return examples


def count(name: str, value) -> int:
    """``value`` if it is an int ≥ 1 (not a bool), else a ``DataError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name}={value!r} must be an integer of at least 1.")
    return value


def resolve_position(gold_position: int | str, n: int, rng: random.Random) -> int:
    """The index ``gold_position`` names among ``n`` documents (``"random"`` draws from ``rng``)."""
    named = {"first": 0, "middle": (n - 1) // 2, "last": n - 1}
    if gold_position == "random":
        return rng.randrange(n)
    if isinstance(gold_position, str):
        if gold_position not in named:
            raise DataError(
                f"gold_position={gold_position!r}: use an int, 'random', 'first', 'middle' or 'last'."
            )
        return named[gold_position]
    if isinstance(gold_position, bool) or not isinstance(gold_position, int):
        raise DataError(f"gold_position={gold_position!r}: use an int, 'random', 'first', 'middle' or 'last'.")
    if not 0 <= gold_position < n:
        raise DataError(f"gold_position={gold_position} is out of range for {n} documents.")
    return gold_position


def synthetic_vocabulary() -> list[str]:
    """Every word the synthetic task can produce (for the offline word-level tokenizer)."""
    brands = {o + v + c + e for o in _ONSETS for v in _VOWELS for c in _CODAS for e in _ENDINGS}
    words = set(CITIES) | set(INDUSTRIES) | brands | set(_PRODUCTS) | {str(n) for n in (*_YEARS, *_STAFF)}
    text = LITM_INSTRUCTION + f" Document Title Question Answer In which city Based {_VERB} based Founded Makes Employs people The ordered randomly"
    words |= set(re.findall(r"\w+|[^\w\s]+", text))
    return sorted(words)
