"""The switch on tests that need ``../shared/data``: skipped on a user's machine without it,
failed in CI (``CI=true``), which must provide it (conftest.require_shared)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA, require_shared


def test_a_missing_path_fails_in_ci_and_names_the_path(monkeypatch, tmp_path):
    missing = tmp_path / "shared" / "data" / "nq-open-oracle.jsonl.gz"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=re.escape(f"{missing} is missing: CI (CI=true)")):
        require_shared(missing)


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_a_missing_path_skips_outside_ci(monkeypatch, tmp_path, ci):
    missing = tmp_path / "absent"
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=re.escape(f"{missing} is not present")):
        require_shared(missing)


def test_a_present_path_is_returned_in_and_out_of_ci(monkeypatch, tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    for ci in ("true", "false"):
        monkeypatch.setenv("CI", ci)
        assert require_shared(tmp_path / "data.jsonl") == tmp_path / "data.jsonl"
        assert require_shared(tmp_path) == tmp_path


def test_the_shared_data_is_the_repositorys_sibling_folder():
    assert SHARED_DATA == Path(__file__).resolve().parents[2] / "shared" / "data"
