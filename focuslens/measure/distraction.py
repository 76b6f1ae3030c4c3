"""The distraction experiment (paper §2): accuracy as irrelevant documents are added.

The same questions are asked with 1, 5, 10, … documents (the gold plus the first
distractors), with the gold at a random position, and at the largest size also first, in
the middle and last (Lost in the Middle's positional buckets). Accuracy falls as documents
are added: on the synthetic task SmolLM2 goes from ≈ 0.97 with one document to ≈ 0.05 with 20.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd

from focuslens.data.examples import QAExample
from focuslens.measure.evaluate import evaluate_next_token
from focuslens.measure.forward import accuracy_by

__all__ = ["distraction", "distraction_summary"]


def distraction(
    model,
    examples: Sequence[QAExample],
    *,
    n_documents: Sequence[int] = (1, 5, 10, 20),
    positions: Sequence[str] = ("first", "middle", "last"),
    seed: int = 0,
    batch_size: int | None = None,
    quiet: bool = False,
) -> pd.DataFrame:
    """The distraction experiment: the same questions with 1, 5, 10, … documents.

    For each ``n`` in ``n_documents`` every example keeps its gold document and its first
    ``n - 1`` distractors, with the gold at a seeded random position (``setting="random"``).
    For the largest ``n`` the gold is also placed first, in the middle and last
    (``setting=<position>``). Returns one row per (example, setting, n) with the columns of
    :func:`evaluate_next_token` plus ``setting``.
    """

    rng = random.Random(seed)
    runs: list[tuple[str, int, list[QAExample]]] = []
    for n in n_documents:
        runs.append(("random", n, [ex.with_n_documents(n, rng.randrange(n)) for ex in examples]))
    n_max = max(n_documents)
    for pos in positions:
        index = {"first": 0, "middle": (n_max - 1) // 2, "last": n_max - 1}[pos]
        runs.append((pos, n_max, [ex.with_n_documents(n_max, index) for ex in examples]))
    # one call for every setting: variants of one example share their leading documents,
    # so on CPU each prompt re-uses the KV cache of the prefix it shares with another
    everything = [ex for _, _, exs in runs for ex in exs]
    df = evaluate_next_token(model, everything, batch_size=batch_size, quiet=quiet, desc="distraction")
    df["setting"] = [setting for setting, _, exs in runs for _ in exs]
    return df


def distraction_summary(results: pd.DataFrame) -> dict:
    """The ``"distraction"`` section of ``summary.json`` from :func:`distraction` rows."""
    rand = results[results.setting == "random"]
    n_max = int(results.n_documents.max())
    pos = results[(results.setting != "random") & (results.n_documents == n_max)]
    return {
        "n_prompts": int(rand.groupby("n_documents").size().min()),
        "metric": "top-1 next-token accuracy of the gold answer's first token",
        "accuracy": {str(k): v for k, v in accuracy_by(rand, "n_documents").items()},
        "candidate_accuracy": {
            str(k): v for k, v in accuracy_by(rand, "n_documents", "candidate_correct").items()
        },
        f"by_gold_position_{n_max}": accuracy_by(pos, "setting"),
    }
