"""The README's HyperSpy section (readme_section.md, sent to the lead for README.md) runs.

Here it runs with the stand-in core (fake_core) and the extension registered from its yaml,
so it checks the calls, shapes and axes it shows; with the shipped model in place the lead
runs the same text in README.md with ``pytest --doctest-glob=README.md README.md``.
"""

from __future__ import annotations

import doctest
import io
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_hyperspy_section_runs(registered, fake_core, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    assert (REPO / "sample_data" / "defocus_series_small.hspy").exists()
    monkeypatch.chdir(REPO)
    text = (Path(__file__).parent / "readme_section.md").read_text()
    test = doctest.DocTestParser().get_doctest(text, {}, "readme_section", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = runner.run(test, out=report.write)
    assert result.attempted > 10
    assert result.failed == 0, report.getvalue()[-6000:]
    assert len(fake_core.calls) >= 5  # segment x2, ood_score, evaluate, session segment
