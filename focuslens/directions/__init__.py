"""Focus directions (Zhu et al. 2025, §3.3): the artifact, the paper's release, the training
cache and training.

Owns: :class:`FocusDirections` (:mod:`.artifact`: safetensors + JSON, checked on load) and
the release importer, the training cache behind one protocol (:mod:`.cache` in memory,
:mod:`.streamed` on disk) and :func:`train_directions` (:mod:`.train`).

May import: :mod:`focuslens.data`, :mod:`focuslens.model`, :mod:`focuslens.measure` and
the top-level helpers (never :mod:`focuslens.steer`: applying directions lives there).
"""

from focuslens.directions.artifact import FocusDirections, import_release
from focuslens.directions.cache import AttentionInputs, TrainingCache, collect_attention_inputs
from focuslens.directions.streamed import ShardedInputs, cache_to_disk
from focuslens.directions.train import span_attention, train_directions

__all__ = ["FocusDirections", "import_release", "TrainingCache", "AttentionInputs", "collect_attention_inputs",
           "ShardedInputs", "cache_to_disk", "span_attention", "train_directions"]
