"""Splits of examples into train / validation / test, one module for all of them.

* :func:`split_by_question`: any list of examples, no question crossing splits (NQ).
* :func:`steering_splits`: generated examples disjoint by seed, the test questions at the
  paper's gold positions (:func:`gold_positions`), as the steering experiments use them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from focuslens.data.examples import QAExample
from focuslens.data.synthetic import make_synthetic_qa
from focuslens.errors import DataError

__all__ = ["split_by_question", "gold_positions", "steering_splits"]


def split_by_question(
    examples: Sequence[QAExample],
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
    *,
    seed: int = 0,
) -> dict[str, list[QAExample]]:
    """Split examples into train / validation / test so that no question crosses splits.

    All examples sharing a ``qid`` (or, when empty, a question string) land in the same
    split. The assignment is a seeded shuffle of the unique questions.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"fractions={fractions} must be three non-negative numbers summing to 1.")
    keys = list(dict.fromkeys(ex.qid or ex.question for ex in examples))
    random.Random(seed).shuffle(keys)
    n_train = round(fractions[0] * len(keys))
    n_val = round(fractions[1] * len(keys))
    which = {k: "train" for k in keys[:n_train]}
    which.update({k: "validation" for k in keys[n_train : n_train + n_val]})
    which.update({k: "test" for k in keys[n_train + n_val :]})
    out: dict[str, list[QAExample]] = {"train": [], "validation": [], "test": []}
    for ex in examples:
        out[which[ex.qid or ex.question]].append(ex)
    return out


def gold_positions(n_documents: int, n: int = 5) -> tuple[int, ...]:
    """``n`` spread-out gold positions, first and last included, as the paper places them:
    ``max(0, i·N/(n−1) − 1)`` (20 documents: 0, 4, 9, 14, 19; 10 documents: 0, 1, 4, 6, 9);
    every position when there are at most ``n`` documents."""
    if n_documents <= n:
        return tuple(range(n_documents))
    return tuple(sorted({max(0, i * n_documents // (n - 1) - 1) for i in range(n)}))


def steering_splits(*, n_train: int = 200, n_validation: int = 100, n_test: int = 200, n_documents: int = 20,
                    seed: int = 4, make: Callable[[int, int], list] | None = None) -> dict:
    """Train / validation / test examples for steering, disjoint by seed (train ``seed``,
    validation ``seed + 1``, test questions ``seed + 2``). Test questions appear with the
    gold at each of :func:`gold_positions` (``n_test`` prompts in all), for per-position
    results; the others at random positions. ``make(n, seed)`` builds the examples (default:
    :func:`~focuslens.data.synthetic.make_synthetic_qa` with ``n_documents``)."""

    positions = gold_positions(n_documents)
    if n_test < 0 or n_test % len(positions):
        raise DataError(f"n_test={n_test}: the test questions appear once per gold position {positions}, so n_test "
                        f"must be a multiple of {len(positions)} (e.g. {max(len(positions), n_test - n_test % len(positions))}).")
    n_questions = n_test // len(positions)
    if make is None:
        def make(n, seed):
            return make_synthetic_qa(n, n_documents=n_documents, seed=seed)
    questions = make(n_questions, seed + 2) if n_questions else []
    return {
        "train": make(n_train, seed) if n_train else [],
        "validation": make(n_validation, seed + 1) if n_validation else [],
        "test": [ex.with_gold_at(p) for ex in questions for p in positions],
        "positions": positions,
    }
