"""Interventions on attention: split-softmax (needs the gold label) and focus directions
(label-free), as values that install hooks on a model, and their sweeps.

Owns: :mod:`.split_softmax` and :mod:`.focus`.

May import: :mod:`focuslens.data`, :mod:`focuslens.model`, :mod:`focuslens.measure`,
:mod:`focuslens.directions` and the top-level helpers.
"""

from focuslens.steer.focus import Focus, MagnitudeControl, best_setting, focus, focus_hooks, focus_sweep
from focuslens.steer.split_softmax import (
           SplitSoftmax,
           split_softmax,
           split_softmax_hooks,
           split_softmax_sweep,
)

__all__ = ["SplitSoftmax", "Focus", "split_softmax", "split_softmax_hooks", "split_softmax_sweep", "focus", "focus_hooks", "focus_sweep",
           "best_setting", "MagnitudeControl"]
