"""Figure export: offline HTML always; PNG when Chromium is there, a warning (after one
retry) when the export fails; FOCUSLENS_FORMATS sets the default formats."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

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

    def flaky(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("browser went away")

    monkeypatch.setattr(fig, "write_image", flaky)
    with pytest.warns(UserWarning, match=r"no PNG for f: static export failed twice \(RuntimeError: browser went away\)"):
        written = fig.save(tmp_path / "f", formats=("html", "png"))
    assert len(calls) == 2 and [p.suffix for p in written] == [".html"]
    calls.clear()

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("browser went away")
        (tmp_path / "f.png").write_bytes(b"png")

    monkeypatch.setattr(fig, "write_image", fails_once)
    assert [p.suffix for p in fig.save(tmp_path / "f", formats=("html", "png"))] == [".html", ".png"]  # 2nd try
    assert len(calls) == 2
