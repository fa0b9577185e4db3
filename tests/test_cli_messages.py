"""The command line prints the package's own warnings and leaves the rest to Python."""

from __future__ import annotations

import warnings

import pytest


def _library_warning(text: str) -> None:
    """A warning attributed to a module named like a third-party library."""
    namespace = {"__name__": "libx", "warnings": warnings}
    exec(compile("def give(t):\n    warnings.warn(t, UserWarning)\n", "libx.py", "exec"), namespace)
    namespace["give"](text)


def test_the_packages_warnings_are_printed_and_a_librarys_are_shown_as_python_would(capsys):
    from napari_hrtem_transfer._cli.messages import captured_warnings, print_warnings
    from napari_hrtem_transfer.io.frames import ReaderWarning

    with captured_warnings() as caught:
        warnings.warn("pixels are not square", ReaderWarning, stacklevel=1)
        warnings.warn("pixels are not square", ReaderWarning, stacklevel=1)  # again: kept
        _library_warning("a library's own remark")
    # the library's warning goes to Python's warning display (pytest records it here)
    with pytest.warns(UserWarning, match="a library's own remark") as shown:
        printed = print_warnings(caught, "hrtem-transfer segment", "frame.dm4")
    assert [str(w.message) for w in shown] == ["a library's own remark"]
    assert printed == ["pixels are not square"] * 2
    err = capsys.readouterr().err
    assert err.count("hrtem-transfer segment: warning: frame.dm4: pixels are not square\n") == 2
    assert "a library" not in err


def test_the_users_warning_filters_still_apply_to_library_warnings(capsys):
    from napari_hrtem_transfer._cli.messages import captured_warnings, print_warnings
    from napari_hrtem_transfer.io.frames import ReaderWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="libx")  # -W ...:libx
        with captured_warnings() as caught:
            _library_warning("silenced by the user")
            warnings.warn("ours", ReaderWarning, stacklevel=1)
        assert print_warnings(caught, "hrtem-transfer segment") == ["ours"]
    assert "silenced by the user" not in capsys.readouterr().err
