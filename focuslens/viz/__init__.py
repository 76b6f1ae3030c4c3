"""Figures: plotly objects for Jupyter, saved as offline HTML and PNG."""

from focuslens.viz.distraction import plot_distraction
from focuslens.viz.heads import plot_head_map, plot_rank_agreement
from focuslens.viz.export import save_figure, static_export_available

__all__ = ["plot_distraction", "plot_head_map", "plot_rank_agreement", "save_figure", "static_export_available"]
