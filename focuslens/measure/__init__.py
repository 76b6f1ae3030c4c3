"""Measurements: what the unsteered (or steered) model does, per prompt and per head.

Owns: evaluation and its metrics (:mod:`.evaluate`: one row scorer, next-token and greedy
answers), per-head results (:mod:`.results`: the base class, the one ranking rule),
contextual-head scores (:mod:`.scoring`), distraction curves (:mod:`.distraction`; the
function is ``focuslens.distraction``) and the
statistics every table uses (:mod:`.stats`).

May import: :mod:`focuslens.data`, :mod:`focuslens.model` and the top-level helpers.
"""

from focuslens.measure.evaluate import evaluate_generation, evaluate_next_token
from focuslens.measure.results import HeadResult, rank_heads
from focuslens.measure.scoring import HeadScores, score_heads

__all__ = ["evaluate_next_token", "evaluate_generation", "HeadResult", "rank_heads", "HeadScores", "score_heads"]
