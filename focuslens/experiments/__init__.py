"""Experiments: the paper's story as stages, the demo pipeline, the focus-conditions grid,
figures drawn from saved results, and the ``focuslens`` command line.

Owns: :mod:`.stages` (each stage runs one experiment and returns a ``StageResult``),
:mod:`.pipeline` (the demo), :mod:`.conditions` (the grid of tasks × layouts × rankings),
:mod:`.figures` (every figure of a run folder) and :mod:`.cli`.

May import every other folder; nothing imports it.
"""
