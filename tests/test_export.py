"""Figure export: offline HTML always; PNG when Chromium is there, a warning (after one
retry) when the export fails; FOCUSLENS_FORMATS sets the default formats; every file is
written atomically (io.write_atomic)."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from focuslens.io import write_atomic
from focuslens.viz.export import Figure, default_formats, static_export_available


def _figure() -> Figure:
    return Figure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])))


def test_default_formats_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FOCUSLENS_FORMATS", "html")
    assert default_formats() == ("html",)
    assert [p.suffix for p in _figure().save(tmp_path / "f")] == [".html"]
    monkeypatch.delenv("FOCUSLENS_FORMATS")
    assert default_formats() == ("html", "png")


@pytest.mark.skipif(not static_export_available(), reason="no Chromium for kaleido")
def test_a_png_is_written_when_asked(tmp_path):
    written = _figure().save(tmp_path / "f", formats=("html", "png"))
    assert [p.suffix for p in written] == [".html", ".png"]
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not static_export_available(), reason="no Chromium for kaleido")
def test_a_failing_export_is_retried_once_then_warns_and_keeps_the_html(tmp_path, monkeypatch):
    fig, calls = _figure(), []
    (tmp_path / "f.png").write_bytes(b"the previous png")

    def flaky(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("browser went away")

    monkeypatch.setattr(fig, "to_image", flaky)
    with pytest.warns(UserWarning, match=r"no PNG for f: static export failed twice \(RuntimeError: browser went away\)"):
        written = fig.save(tmp_path / "f", formats=("html", "png"))
    assert len(calls) == 2 and [p.suffix for p in written] == [".html"]
    assert (tmp_path / "f.png").read_bytes() == b"the previous png"  # a failed export leaves the old file
    calls.clear()

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("browser went away")
        return b"png"

    monkeypatch.setattr(fig, "to_image", fails_once)
    assert [p.suffix for p in fig.save(tmp_path / "f", formats=("html", "png"))] == [".html", ".png"]  # 2nd try
    assert len(calls) == 2 and (tmp_path / "f.png").read_bytes() == b"png"


def test_every_file_is_written_whole_through_write_atomic(tmp_path, monkeypatch):
    """HTML and images are rendered to memory, then renamed into place (io.write_atomic):
    the final path never holds a partial file, and no temporary file is left."""
    from focuslens.viz import export

    fig, atomic = _figure(), []
    monkeypatch.setattr(export, "write_atomic", lambda path, data: atomic.append(path) or write_atomic(path, data))
    monkeypatch.setattr(fig, "to_image", lambda format, **size: f"<{format} {size['width']}x{size['height']}>".encode())
    monkeypatch.setattr(export, "static_export_available", lambda: True)
    written = fig.save(tmp_path / "sub" / "f.whatever", formats=("html", "png", "svg"), width=300, height=200)
    assert written == atomic == [tmp_path / "sub" / f"f.{s}" for s in ("html", "png", "svg")]
    page = written[0].read_text()
    assert page.startswith("<!doctype html>") and page.endswith("</html>") and len(page) > 1_000_000  # plotly.js inline
    assert written[1].read_bytes() == b"<png 300x200>" and written[2].read_bytes() == b"<svg 300x200>"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.html", "f.png", "f.svg"]


def test_an_unwritable_target_raises_instead_of_warning(tmp_path, monkeypatch):
    fig = _figure()
    monkeypatch.setattr(fig, "to_image", lambda **kw: b"png")
    monkeypatch.setattr("focuslens.viz.export.static_export_available", lambda: True)
    (tmp_path / "f.png").mkdir()  # a folder where the PNG should go: the rename fails
    with pytest.raises(OSError):
        fig.save(tmp_path / "f", formats=("html", "png"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # its temporary file is gone
