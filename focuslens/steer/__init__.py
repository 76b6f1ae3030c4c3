"""Interventions on attention, as values that install hooks on a model (or rewrite the
prompt), and their sweeps.

Owns: the span-mass engine (:mod:`.span_mass`) and the interventions built on it —
split-softmax (:mod:`.split_softmax`), PASTA (:mod:`.pasta`), SpotLight (:mod:`.spotlight`),
all needing the gold label — and the label-free ones: focus directions (:mod:`.focus`),
Ms-PoE (:mod:`.ms_poe`), positional calibration (:mod:`.calibration`) and AttnRank
(:mod:`.reorder`). Every module of this folder is imported here, so an intervention class
that sets ``METHOD`` joins :data:`~focuslens.model.intervention.METHODS` (the methods
comparison, ``focuslens experiment methods``) by being written: a new intervention is one
new module.

May import: :mod:`focuslens.data`, :mod:`focuslens.model`, :mod:`focuslens.measure`,
:mod:`focuslens.directions` and the top-level helpers.
"""

import importlib
import pkgutil

from focuslens.model.intervention import METHODS
from focuslens.steer.calibration import PositionCalibration
from focuslens.steer.context import MethodContext
from focuslens.steer.focus import Focus, MagnitudeControl, best_setting, focus, focus_hooks, focus_sweep
from focuslens.steer.ms_poe import MsPoE
from focuslens.steer.pasta import Pasta
from focuslens.steer.reorder import AttnRank
from focuslens.steer.span_mass import SpanMassEdit
from focuslens.steer.split_softmax import (
           SplitSoftmax,
           split_softmax,
           split_softmax_hooks,
           split_softmax_sweep,
)
from focuslens.steer.spotlight import SpotLight

for _module in pkgutil.iter_modules(__path__):  # a new module registers its interventions by being imported
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SplitSoftmax", "Focus", "split_softmax", "split_softmax_hooks", "split_softmax_sweep", "focus", "focus_hooks", "focus_sweep",
           "best_setting", "MagnitudeControl", "SpanMassEdit", "Pasta", "SpotLight", "MsPoE", "PositionCalibration",
           "AttnRank", "METHODS", "MethodContext"]
