"""Figures: plotly objects for Jupyter, saved as offline HTML and PNG."""

from focuslens.viz.distraction import plot_distraction
from focuslens.viz.export import save_figure, static_export_available

__all__ = ["plot_distraction", "save_figure", "static_export_available"]
