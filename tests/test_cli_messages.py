"""The command line prints the package's own warnings and leaves the rest to Python."""

from __future__ import annotations

import warnings

import pytest


def test_the_packages_warnings_are_printed_and_a_librarys_are_handed_back(capsys):
    from napari_hrtem_transfer._cli.messages import print_warnings
    from napari_hrtem_transfer.io.frames import ReaderWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("pixels are not square", ReaderWarning, stacklevel=1)
        warnings.warn("old keyword", DeprecationWarning, stacklevel=1)
    with pytest.warns(DeprecationWarning, match="old keyword"):
        printed = print_warnings(caught, "hrtem-transfer segment", "frame.dm4")
    assert printed == ["pixels are not square"]
    err = capsys.readouterr().err
    assert err == "hrtem-transfer segment: warning: frame.dm4: pixels are not square\n"
