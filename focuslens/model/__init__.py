"""The model and its hook points: everything between a rendered prompt and a forward pass.

Owns: loading a ``TransformerBridge`` (:mod:`.load`: embedded models, hub ids, folders),
the hook-point names and the one span-mass reduction (:mod:`.hooks`), head selection
(:mod:`.heads`: the one place an int becomes the top k of a ranking), rows and spans
(:mod:`.spans`), the shared-prefix KV cache (:mod:`.prefix`), greedy decoding
(:mod:`.decode`), data parallel runs (:mod:`.parallel`), the one NaN/inf check
(:mod:`.finite`) and tiny random models for tests (:mod:`.testing`).

May import: :mod:`focuslens.data` and the top-level helpers (errors, io, progress).
"""

from focuslens.model.heads import Head, all_heads, ranking_of, resolve_heads
from focuslens.model.load import load_model, model_id
from focuslens.model.prefix import PrefillStore, PrefixCache
from focuslens.model.spans import ROWS, resolve_rows, resolve_span

__all__ = ["load_model", "model_id", "Head", "all_heads", "ranking_of", "resolve_heads", "ROWS", "resolve_rows",
           "resolve_span", "PrefixCache", "PrefillStore"]
