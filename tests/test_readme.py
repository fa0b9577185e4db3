"""The README's examples written as doctests run, with the real core and the shipped model."""

from __future__ import annotations

import doctest
import io
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_doctests_run(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(REPO)
    text = (REPO / "README.md").read_text()
    test = doctest.DocTestParser().get_doctest(text, {}, "README", str(REPO / "README.md"), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = runner.run(test, out=report.write)
    assert result.attempted >= 15, result
    assert result.failed == 0, report.getvalue()[-6000:]
