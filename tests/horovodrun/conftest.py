"""Every test under tests/horovodrun carries the ``horovodrun`` marker (pyproject.toml), set
here rather than in each file, so ``-m horovodrun`` / ``-m "not horovodrun"`` select by
directory and no file can forget it."""

import pathlib

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in pathlib.Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.horovodrun)
