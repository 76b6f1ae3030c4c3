"""The demo's stages: each runs one experiment and returns a :class:`StageResult`.

* :mod:`focuslens.experiments.stages.heads` — distraction, contextual heads, causal importance.
* :mod:`focuslens.experiments.stages.steer` — split-softmax, focus directions, one prompt's views.
* :mod:`focuslens.experiments.stages.long_context` — distraction and split-softmax from ~1k to ~8k tokens.

Stages pass their results to later stages and to :mod:`focuslens.experiments.figures` in memory;
:meth:`StageResult.save` writes what a user keeps and :func:`load_stage` reads it back.
"""

from focuslens.experiments.stages.base import StageResult, load_stage
from focuslens.experiments.stages.heads import (
    SCORING_SETTINGS,
    run_contextual_heads,
    run_distraction,
    run_patching,
)
from focuslens.experiments.stages.long_context import run_long_context
from focuslens.experiments.stages.steer import (
    example_from_json,
    example_to_json,
    run_focus_directions,
    run_prompt_views,
    run_split_softmax,
)

__all__ = ["StageResult", "load_stage", "run_distraction", "run_contextual_heads", "run_patching",
           "run_split_softmax", "run_focus_directions", "run_long_context", "run_prompt_views", "example_to_json", "example_from_json", "SCORING_SETTINGS"]
