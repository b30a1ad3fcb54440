"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def clean_sluiceway_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run every test without the caller's SLUICEWAY_* settings (SLUICEWAY_TEST_* stay)."""
    for name in list(os.environ):
        if name.startswith("SLUICEWAY_") and not name.startswith("SLUICEWAY_TEST_"):
            monkeypatch.delenv(name)
    return
