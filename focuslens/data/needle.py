"""Needle in a haystack with near-miss distractor needles, generated offline with a seed.

The haystack is ``n_documents`` filler documents (seeded sentences about weather, markets
and travel that never name a vault); one of them carries the **needle**::

    The passcode of the crimson falcon vault is Lisbon.

and ``n_distractors`` others carry **near-miss needles**: the same sentence for keys that
differ from the asked one by one word (``crimson hawk``, ``scarlet falcon``, …), each with
another city. The question asks for the passcode of the needle's key; the answer opens
with ``answer_prefix`` (``The passcode of the crimson falcon vault is``), so one forward
pass scores it (the gold city's first token; the distractor needles' cities are the
``candidates``, whose first tokens are distinct, as in :mod:`focuslens.data.synthetic`).
A model that retrieves by the word ``vault`` alone is fooled by the near misses; one that
attends to the right needle is not. Documents render like the other QA tasks, so document
slots, gold positions and span masses work unchanged.

>>> ex = make_needle_examples(1, n_documents=8, seed=0)[0]
>>> ex.answers[0] in ex.documents[ex.gold_index].text, len(ex.candidates)
(True, 5)
"""

from __future__ import annotations

import random

from focuslens.data.examples import Document, QAExample
from focuslens.data.synthetic import CITIES, count, resolve_position

__all__ = ["make_needle_examples", "needle_vocabulary", "NEEDLE_INSTRUCTION"]

NEEDLE_INSTRUCTION = ("Read the documents below. Exactly one of them states the passcode of the vault asked "
                      "about; others mention similar vaults. Answer with the city that is the passcode.")
_COLOURS = "crimson scarlet amber golden silver violet azure emerald ivory copper".split()
_ANIMALS = "falcon hawk heron otter badger lynx raven wolf stag marten".split()
_SUBJECTS = ("The harbour", "The old market", "The northern road", "The river ferry", "The council", "The museum",
             "The mill", "The valley school", "The station", "The orchard")
_VERBS = "reopened after repairs|reported a quiet week|changed its opening hours|hosted a small fair|" \
         "was busy with visitors|raised its prices slightly|closed early because of rain|" \
         "welcomed a new manager|printed a new timetable|planted trees along the path".split("|")
_TIMES = "on Monday|in the spring|last winter|during the festival|after the storm|before noon|" \
         "at the end of the month|in early autumn".split("|")


def _filler(rng: random.Random, n_sentences: int) -> str:
    return " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TIMES)}." for _ in range(n_sentences))


def _near_misses(key: tuple[str, str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` keys that differ from ``key`` in one word (colour or animal), distinct."""
    pool = [(c, key[1]) for c in _COLOURS if c != key[0]] + [(key[0], a) for a in _ANIMALS if a != key[1]]
    return rng.sample(pool, n)


def make_needle_examples(
    n_examples: int,
    *,
    n_documents: int = 20,
    n_distractors: int = 4,
    sentences_per_document: int = 8,
    gold_position: int | str = "random",
    seed: int = 0,
) -> list[QAExample]:
    """Seeded needle-in-a-haystack examples (module docstring).

    Args:
        n_examples: how many examples.
        n_documents: documents per prompt (haystack size; ~110 SmolLM2 tokens each with
            the default 8 sentences).
        n_distractors: near-miss needles, placed in other documents (at most
            ``n_documents - 1`` and 18).
        gold_position: the needle's document index, or ``"random"``, ``"first"``,
            ``"middle"``, ``"last"``.
        seed: the generator seed (the same seed gives the same examples).
    """
    count("n_examples", n_examples)
    count("n_documents", n_documents)
    n_distractors = min(n_distractors, n_documents - 1, 18)
    rng = random.Random(f"focuslens-needle-{seed}")
    examples = []
    for i in range(n_examples):
        key = (rng.choice(_COLOURS), rng.choice(_ANIMALS))
        keys = [key, *_near_misses(key, n_distractors, rng)]
        cities = rng.sample(CITIES, len(keys))
        pos = resolve_position(gold_position, n_documents, rng)
        others = rng.sample([j for j in range(n_documents) if j != pos], n_distractors)
        texts = [_filler(rng, sentences_per_document) for _ in range(n_documents)]
        for doc, (colour, animal), city in zip([pos, *others], keys, cities):
            sentences = texts[doc].split(". ")
            at = rng.randrange(len(sentences))
            sentences.insert(at, f"The passcode of the {colour} {animal} vault is {city}")
            texts[doc] = ". ".join(sentences)
        documents = tuple(Document(title=f"Notes {j + 1}", text=t) for j, t in enumerate(texts))
        examples.append(QAExample(
            instruction=NEEDLE_INSTRUCTION, documents=documents, gold_index=pos,
            question=f"What is the passcode of the {key[0]} {key[1]} vault?", answers=(cities[0],),
            answer_prefix=f"The passcode of the {key[0]} {key[1]} vault is", candidates=tuple(cities),
            qid=f"needle-{seed}-{i}",
            meta={"source": "needle-synthetic", "seed": seed, "gold_position": pos, "distractor_documents": others},
        ))
    return examples


def needle_vocabulary() -> list[str]:
    """Every word the needle task writes (for word-level test tokenizers)."""
    text = " ".join([NEEDLE_INSTRUCTION, *_COLOURS, *_ANIMALS, *_SUBJECTS, *_VERBS, *_TIMES,
                     "The passcode of the vault is What Notes"])
    return sorted(set(text.replace(".", " ").replace(";", " ").replace("?", " ").replace(",", " ").split()))
