"""One error family for focuslens: every message names the bad field and the fix."""

from __future__ import annotations

__all__ = ["FocusLensError", "DataError", "ModelError", "NonFiniteError"]


class FocusLensError(ValueError):
    """Base class of every error focuslens raises on bad input."""


class DataError(FocusLensError):
    """An example, prompt or data file is malformed (the message names the field)."""


class ModelError(FocusLensError):
    """A model cannot be loaded or does not match an artifact (the message says why)."""


class NonFiniteError(DataError, ModelError):
    """NaN or inf where a number must be finite: a broken weight, cached tensor or
    intervention (:func:`focuslens.model.finite.require_finite` names which)."""
