"""The field's head scores side by side (:mod:`.base`), one module per score.

Every module of this folder is imported here, and each :class:`~.base.HeadScore` subclass
with a ``name`` registers itself in :data:`~.base.SCORES`: a new score is one new module,
with no change elsewhere (``focuslens experiment methods`` and :func:`rank_heads_by` pick
it up by name).

=================  =====================================================  ===================
name               what it measures                                       paper
=================  =====================================================  ===================
``contextual``     gold-document mass at the answer rows                  Zhu et al. 2025
``retrieval``      how often the top-attended key is the token copied      Wu et al. 2024
``query_focused``  gold-document mass at the question's tokens            Zhang et al. 2025
``contrastive``    gold mass minus a typical irrelevant document's         Tran et al. 2025
``calibrated``     gold mass with the question minus with "N/A"           Chen et al. 2025
``causal``         attribution-patching effect on the answer               Nanda 2023 / Syed
=================  =====================================================  ===================

(``causal`` lives with the other causal tests, :mod:`focuslens.causal.score`, and registers
when :mod:`focuslens.causal` is imported — ``import focuslens`` does.)
"""

import importlib
import pkgutil

from focuslens.measure.head_scores.base import PASSES, SCORES, HeadScore, Reading, rank_heads_by, register_pass

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["HeadScore", "Reading", "SCORES", "PASSES", "register_pass", "rank_heads_by"]
