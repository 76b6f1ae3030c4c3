"""Figures: plotly objects for Jupyter (:class:`Figure`, with ``.save(path)`` writing
offline HTML and PNG/SVG). The tables behind the cross-model figures are in
:mod:`focuslens.viz.compare`, the figures drawn from them in :mod:`focuslens.viz.cross_model`.

Owns: drawing. It draws what it is given and never runs a model.

May import: data, model, measure, causal, directions and steer (for their result types);
never :mod:`focuslens.experiments`, which calls it.
"""

from focuslens.viz.cross_model import (
    plot_direction_norms,
    plot_direction_similarity,
    plot_head_locations,
    plot_norm_vs_rank,
)
from focuslens.viz.distraction import plot_distraction
from focuslens.viz.export import Figure, save_figure, static_export_available
from focuslens.viz.heads import plot_head_map, plot_rank_agreement, plot_topk_overlap
from focuslens.viz.long_context import plot_long_context, plot_long_context_positions, plot_slot_profile
from focuslens.viz.prompt import AttentionHTML, plot_document_attention, plot_key_bias, token_view
from focuslens.viz.steering import plot_focus_sweep, plot_split_softmax_sweep

__all__ = [
    "Figure",
    "save_figure",
    "static_export_available",
    # one model, the pipeline's stages
    "plot_distraction",
    "plot_head_map",
    "plot_rank_agreement",
    "plot_split_softmax_sweep",
    "plot_focus_sweep",
    "plot_long_context",
    "plot_long_context_positions",
    "plot_slot_profile",
    # one prompt
    "plot_document_attention",
    "token_view",
    "AttentionHTML",
    "plot_key_bias",
    # across models and settings
    "plot_head_locations",
    "plot_direction_norms",
    "plot_direction_similarity",
    "plot_norm_vs_rank",
    "plot_topk_overlap",
]
