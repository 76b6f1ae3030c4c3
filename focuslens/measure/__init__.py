"""Measurements: what the unsteered (or steered) model does, per prompt and per head.

Owns: evaluation and its metrics (:mod:`.evaluate`: one row scorer, next-token and greedy
answers; the one variant engine under every sweep), the recorder of span masses
(:mod:`.record`), per-head results (:mod:`.results`: the base class, the one ranking rule),
contextual-head scores (:mod:`.scoring`), the field's other head scores on the same
reduction (:mod:`.head_scores`, one module per score), positional attention profiles
(:mod:`.position`), distraction curves (:mod:`.distraction`; the
function is ``focuslens.distraction``) and the
statistics every table uses (:mod:`.stats`).

May import: :mod:`focuslens.data`, :mod:`focuslens.model` and the top-level helpers.
"""

from focuslens.measure.evaluate import (
           evaluate_generation,
           evaluate_next_token,
           evaluate_variants,
           reference_accuracies,
)
from focuslens.measure.head_scores import SCORES, HeadScore, rank_heads_by
from focuslens.measure.position import PositionProfile, position_profile
from focuslens.measure.record import Recording, record
from focuslens.measure.results import HeadResult, rank_heads
from focuslens.measure.scoring import HeadScores, prompt_span_masses, score_heads, token_masses
from focuslens.measure.stats import bootstrap_ci, paired_bootstrap_ci, spearman, wilson_interval

__all__ = ["evaluate_next_token", "evaluate_generation", "evaluate_variants", "reference_accuracies", "record", "Recording",
           "HeadResult", "rank_heads", "HeadScores", "score_heads", "prompt_span_masses", "token_masses", "wilson_interval",
           "spearman", "bootstrap_ci", "paired_bootstrap_ci", "rank_heads_by", "HeadScore", "SCORES", "position_profile",
           "PositionProfile"]
