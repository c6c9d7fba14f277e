"""The tiny toy suite, built once per session (import the fixture from conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def toy_suite_tiny(tmp_path_factory) -> Path:
    """A complete ``size="tiny"`` toy suite (untrained-quality models, every file present).

    Built into a fixed folder of the session's temp dir, so a second registration of this
    fixture (a module that imports it as well as conftest) is a cache hit, not a rebuild.
    """
    from evomerge.toy.build import build_suite

    return build_suite(tmp_path_factory.getbasetemp() / "toy_suite_tiny", size="tiny")
