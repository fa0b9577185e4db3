"""The public home of the atomic writers (io.atomic) and its deprecated private alias."""

import pytest


def test_private_alias_warns_and_gives_the_same_objects():
    from napari_hrtem_transfer.io import _atomic, atomic

    for name in atomic.__all__:
        with pytest.warns(DeprecationWarning, match=rf"io\._atomic\.{name} is deprecated"):
            assert getattr(_atomic, name) is getattr(atomic, name)


def test_private_alias_rejects_unknown_names():
    from napari_hrtem_transfer.io import _atomic

    with pytest.raises(AttributeError):
        _atomic.no_such_writer  # noqa: B018

