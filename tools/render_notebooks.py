"""Execute the analyses notebooks and write static HTML renderings of them.

    python tools/render_notebooks.py                    # small mode, all of analyses/ -> figures/notebooks/
    python tools/render_notebooks.py --size full        # as committed (full size; long)
    python tools/render_notebooks.py 01_paper_story     # one notebook

Each notebook runs top to bottom in a fresh kernel (``FOCUSLENS_NB_SMALL=1`` in small mode)
with plotly's ``plotly_mimetype`` renderer, as in Jupyter; then every figure output gets a
PNG (kaleido + Chromium, one browser for all of them, each tried up to 3 times), which is
what the HTML shows (``<img src="data:image/png;base64,...">``), so the page needs no
JavaScript for its plots. A figure whose PNG cannot be made (no Chromium, or it failed 3
times) is embedded as interactive plotly HTML instead (plotly.js from its CDN), with a note
on stderr. The committed notebooks are read, never written: analyses/ stays without outputs.
``make figures`` (and ``make notebooks``) run this.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ROOT / "analyses"
SETUP = """import plotly.io as pio
pio.renderers.default = "plotly_mimetype"
"""
PLOTLY = "application/vnd.plotly.v1+json"


def png_export_available() -> bool:
    """kaleido and a Chromium binary (as ``focuslens.viz`` finds them)."""
    try:
        from focuslens.viz.export import static_export_available
    except ImportError:
        return False
    return static_export_available()


def execute(path: Path, *, small: bool, timeout: int) -> tuple[nbformat.NotebookNode, float]:
    """Run the notebook in a fresh kernel (the setup cell first); return it and its run time."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(SETUP))
    if small:
        os.environ["FOCUSLENS_NB_SMALL"] = "1"
    else:
        os.environ.pop("FOCUSLENS_NB_SMALL", None)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ANALYSES)}}).execute()
    seconds = time.perf_counter() - start
    nb.cells.pop(0)
    for cell in nb.cells:  # number the notebook's own cells from 1
        if cell.cell_type == "code" and cell.execution_count:
            cell.execution_count -= 1
            for out in cell.outputs:
                if out.output_type == "execute_result":
                    out.execution_count = cell.execution_count
    return nb, seconds


def tidy(nb: nbformat.NotebookNode) -> None:
    """Drop progress-bar output (stderr streams with carriage returns, or blank) and the execution metadata."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr"
                                                            and ("\r" in o.text or not o.text.strip()))]


def header(name: str, *, small: bool, seconds: float, png: bool) -> nbformat.NotebookNode:
    size = ("**small mode** (`FOCUSLENS_NB_SMALL=1`: a few prompts per experiment, so the numbers are "
            "noise; read it for what each cell shows, and the notebook's *What to look for* lines for "
            "the full-size results)") if small else "**full size** (the notebook as committed)"
    plots = ("Plots are static PNG images" if png else
             "Some or all plots are interactive plotly figures (plotly.js from its CDN) for want of a PNG")
    return nbformat.v4.new_markdown_cell(
        f"> Static rendering of `analyses/{name}.ipynb`, executed on {date.today().isoformat()} in "
        f"{seconds:.0f} s on this machine's CPU at {size}. {plots}. Rebuild with `make notebooks` "
        f"(`make figures` does it too; `make notebooks NB_SIZE=full` for the full size); run it "
        f"yourself in Jupyter for interactive plots."
    )


def figure_outputs(nb: nbformat.NotebookNode):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type in ("display_data", "execute_result") and PLOTLY in out.data:
                yield out


def to_png(fig: dict, tries: int = 3) -> str | None:
    """The figure as base64 PNG at its layout's size (900 x 600 if unset), or None."""
    import base64

    import plotly.io as pio

    layout = fig.get("layout", {})
    for attempt in range(1, tries + 1):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The kopts argument is ignored", UserWarning)
                png = pio.to_image(fig, format="png", width=layout.get("width") or 900,
                                   height=layout.get("height") or 600, scale=1, validate=False)
            return base64.b64encode(png).decode("ascii")
        except Exception as err:  # noqa: BLE001 - the browser behind kaleido fails now and then
            if attempt == tries:
                print(f"warning: no PNG for a figure ({type(err).__name__}: {str(err)[:200]}); "
                      "embedding it as interactive HTML", file=sys.stderr)
    return None


def title_of(fig: dict) -> str:
    title = fig.get("layout", {}).get("title", {})
    text = title.get("text", "") if isinstance(title, dict) else str(title)
    return " ".join(re.sub(r"</?(?:br|b|i|em|sup|sub|span)\b[^>]*>", " ", text).split()) or "plotly figure"


def add_images(nb: nbformat.NotebookNode, *, png: bool) -> dict[str, str]:
    """Give each figure output a PNG (or, failing that, plotly HTML); returns {PNG: title}."""
    import plotly.io as pio

    images = {}
    for out in figure_outputs(nb):
        image = to_png(out.data[PLOTLY]) if png else None
        if image:
            out.data = {"image/png": image, PLOTLY: out.data[PLOTLY]}
            images[image] = title_of(out.data[PLOTLY])
        else:
            out.data = {"text/html": pio.to_html(out.data[PLOTLY], include_plotlyjs="cdn", full_html=False),
                        PLOTLY: out.data[PLOTLY]}
    return images


def with_alt_text(page: str, images: dict[str, str]) -> str:
    """``<img src="data:image/png;base64,..." alt="<figure title>">`` for the figures' PNGs
    (nbconvert writes a placeholder alt text, before the src)."""

    def tag(match: re.Match) -> str:
        data = match.group(3)
        alt = images.get(data[len("data:image/png;base64,"):], match.group(1))
        return f'<img src="{data}" alt="{html.escape(alt)}" class="{match.group(2)}"'

    return re.sub(r'<img alt="([^"]*)" class="([^"]*)" src="(data:image/png;base64,[^"]*)"', tag, page)


def render(path: Path, out: Path, *, small: bool, png: bool, timeout: int) -> tuple[float, int, int]:
    """Execute, add images, write ``out/<name>.html``; returns (seconds, PNGs, HTML figures)."""
    nb, seconds = execute(path, small=small, timeout=timeout)
    tidy(nb)
    n_figures = sum(1 for _ in figure_outputs(nb))
    images = add_images(nb, png=png)
    n_png = sum(1 for out in figure_outputs(nb) if "image/png" in out.data)
    nb.cells.insert(0, header(path.stem, small=small, seconds=seconds, png=n_png == n_figures))
    page, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    target = out / f"{path.stem}.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(with_alt_text(page, images), encoding="utf-8")
    tmp.replace(target)
    return seconds, n_png, n_figures - n_png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="names in analyses/ (default: all)")
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "notebooks")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [ANALYSES / f"{Path(n).stem}.ipynb" for n in args.notebooks] or sorted(ANALYSES.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    png = png_export_available()
    if png:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)  # one browser for every figure
    else:
        print("note: no Chromium/kaleido for PNG export; plots are embedded as interactive HTML", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for path in paths:
            seconds, n_png, n_html = render(path, args.out, small=args.size == "small", png=png, timeout=args.timeout)
            print(f"{args.out / (path.stem + '.html')}: {args.size}, executed in {seconds:.0f} s, "
                  f"{n_png} PNG figures, {n_html} HTML figures", flush=True)
    finally:
        if png:
            kaleido.stop_sync_server(silence_warnings=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
