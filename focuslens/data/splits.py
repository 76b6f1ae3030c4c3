"""Splits of examples into train / validation / test, one module for all of them.

* :func:`split_by_question`: any list of examples, no question crossing splits (NQ).
* :func:`steering_splits`: generated examples disjoint by seed, the test questions at the
  paper's gold positions (:func:`gold_positions`), as the steering experiments use them.
* :func:`nq_splits`: the NQ oracle file's questions split by question, at the sizes of the
  paper's NQ experiment: train and validation with the gold at a random position, test at
  first / middle / last, at one or more document counts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from focuslens.data.examples import QAExample
from focuslens.data.lost_in_the_middle import make_nq_distractor_examples, oracle_lines
from focuslens.data.synthetic import make_synthetic_qa
from focuslens.errors import DataError

__all__ = ["split_by_question", "gold_positions", "steering_splits", "nq_splits", "edge_positions"]


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


def edge_positions(n_documents: int) -> tuple[int, ...]:
    """First, middle and last: ``(0, (N − 1) // 2, N − 1)`` (10 documents: 0, 4, 9), the
    positions :func:`~focuslens.measure.forward.position_label` names."""
    return tuple(sorted({0, (n_documents - 1) // 2, n_documents - 1}))


def nq_splits(path, *, n_train: int, n_validation: int, n_test: int, n_documents: int = 10,
              test_documents: Sequence[int] = (10, 20), seed: int = 0) -> dict:
    """Questions of the NQ oracle file split by question (a seeded shuffle of its lines):
    ``train`` and ``validation`` (one prompt per question, ``n_documents`` documents, the
    gold at a random position seeded by question), and ``test`` — a dict from each of
    ``test_documents`` to that many documents per prompt, the gold at each of
    :func:`edge_positions` (the same questions at every size). Distractors are BM25 hard
    negatives (:func:`~focuslens.data.lost_in_the_middle.make_nq_distractor_examples`); a
    question's prompts do not depend on the split sizes. ``qids`` lists each split's questions."""
    lines = oracle_lines(path)
    sizes = {"n_train": n_train, "n_validation": n_validation, "n_test": n_test}
    bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise DataError(f"{', '.join(bad)}: each split needs a positive number of questions.")
    if sum(sizes.values()) > len(lines):
        raise DataError(f"{n_train} + {n_validation} + {n_test} questions: {path} has {len(lines)}.")
    random.Random(f"focuslens-nq-splits-{seed}").shuffle(lines)
    chosen = {"train": lines[:n_train], "validation": lines[n_train : n_train + n_validation],
              "test": lines[n_train + n_validation : n_train + n_validation + n_test]}
    out: dict = {"qids": {name: [f"nq-{line}" for line in ls] for name, ls in chosen.items()}}
    for name in ("train", "validation"):
        order = {line: i for i, line in enumerate(chosen[name])}
        examples = make_nq_distractor_examples(path, n_documents=n_documents, gold_positions=(0,), seed=seed,
                                               lines=chosen[name])
        placed = []
        for ex in sorted(examples, key=lambda e: order[e.meta["line"]]):
            pos = random.Random(f"focuslens-nq-gold-{seed}-{ex.meta['line']}").randrange(n_documents)
            placed.append(ex.with_gold_at(pos).replace(meta={**ex.meta, "gold_position": pos}))
        out[name] = placed
    out["test"] = {}
    for n_docs in test_documents:
        order = {line: i for i, line in enumerate(chosen["test"])}
        examples = make_nq_distractor_examples(path, n_documents=n_docs, gold_positions=edge_positions(n_docs),
                                               seed=seed, lines=chosen["test"])
        out["test"][n_docs] = sorted(examples, key=lambda e: (order[e.meta["line"]], e.gold_index))
    return out
