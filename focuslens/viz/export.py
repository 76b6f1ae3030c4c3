"""Write plotly figures as offline HTML (always) and PNG/SVG (when a browser exists).

HTML embeds plotly.js (``include_plotlyjs=True``), so files open without network.
Static export uses kaleido ≥ 1, which drives a local Chromium (Debian's ``chromium``,
installed by ``make``); when none is found, or an export fails twice, we say so in a
warning and keep the HTML. ``FOCUSLENS_FORMATS`` (e.g. ``html`` or ``html,svg``) sets the
default formats; the test suite uses ``html`` (a PNG costs seconds).

Every file is rendered to memory first (``to_html`` / ``to_image``) and written with
:func:`focuslens.io.write_atomic`, so a figure on disk is always a whole one: a process
killed mid-export, or an export that fails, leaves the previous file (or none), never a
truncated HTML page or PNG.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import plotly.graph_objects as go

from focuslens.io import write_atomic

__all__ = ["Figure", "save_figure", "static_export_available", "default_formats", "wrap_label"]


class Figure(go.Figure):
    """A plotly figure (shows itself in Jupyter) that can :meth:`save` itself.

    Every focuslens plot returns one: ``fig.save("figures/heads")`` writes
    ``heads.html`` (interactive, offline: plotly.js inlined) and ``heads.png``.
    """

    def save(self, path: str | Path, *, formats=None, width: int | None = None,
             height: int | None = None, scale: int = 2) -> list[Path]:
        """Write the figure next to ``path`` (suffix ignored) in each format (html, png,
        svg, pdf); size defaults to the layout's. Returns the written paths."""
        return save_figure(self, path, formats=formats, width=width or self.layout.width or 900,
                           height=height or self.layout.height or 600, scale=scale)


def _browser() -> str | None:

    return os.environ.get("BROWSER_PATH") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )


def static_export_available() -> bool:
    """True when kaleido ≥ 1 and a Chromium binary are both present."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return _browser() is not None


def default_formats() -> tuple[str, ...]:
    """``$FOCUSLENS_FORMATS`` (comma-separated), else html and png."""
    return tuple(f.strip() for f in os.environ.get("FOCUSLENS_FORMATS", "html,png").split(",") if f.strip())


def save_figure(fig, path: str | Path, *, formats=None, width=900, height=600, scale=2) -> list[Path]:
    """Save ``fig`` next to ``path`` (suffix ignored) in each format (default:
    :func:`default_formats`), each file atomically (:func:`~focuslens.io.write_atomic`);
    returns the written paths."""
    formats = default_formats() if formats is None else formats
    stem = Path(path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if "html" in formats:
        written.append(write_atomic(stem.with_suffix(".html"), fig.to_html(include_plotlyjs=True, full_html=True)))
    static = [f for f in formats if f in ("png", "svg", "pdf")]
    if static and not static_export_available():
        warnings.warn(
            f"no PNG/SVG for {stem.name}: static export needs kaleido>=1 and a Chromium binary "
            "(`apt-get install chromium` or set BROWSER_PATH). The HTML was written.",
            stacklevel=2,
        )
        return written
    for fmt in static:
        image = _render(fig, fmt, stem.name, width=width, height=height, scale=scale if fmt == "png" else 1)
        if image is not None:  # only the rendering may fail quietly: a file that cannot be written raises
            written.append(write_atomic(stem.with_suffix(f".{fmt}"), image))
    return written


def _render(fig, fmt: str, name: str, **size) -> bytes | None:
    """``fig`` as ``fmt`` bytes (kaleido); None, with a warning, when the export fails twice
    (the browser behind kaleido fails now and then: we try once more)."""
    for attempt in (1, 2):
        try:
            return fig.to_image(format=fmt, **size)
        except Exception as err:  # noqa: BLE001 - any export failure leaves the HTML
            if attempt == 2:
                warnings.warn(f"no {fmt.upper()} for {name}: static export failed twice "
                              f"({type(err).__name__}: {err}); the HTML was written.", stacklevel=3)
    return None


def wrap_label(text: str, width: int = 14) -> str:
    """Break a label (a model or setting name) at spaces, slashes or hyphens so it fits a narrow tick label."""
    out, line = [], ""
    for part in text.replace("/", "/\u200b").replace(" ", " \u200b").split("\u200b"):
        if line and len(line) + len(part) > width:
            out.append(line.rstrip())
            line = ""
        line += part
    out.append(line.rstrip())
    return "<br>".join(out)
