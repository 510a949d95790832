"""Fixtures shared across test files."""

from __future__ import annotations

import pytest
from serve_util import memorised_model


@pytest.fixture(scope="session")
def memorised_dir(tmp_path_factory):
    """A tiny model dir (named tiny-r1) that has memorised serve_util.KNOWN's `<think>` answers: trained once."""
    d = tmp_path_factory.mktemp("served") / "tiny-r1"
    memorised_model(d)
    return d
