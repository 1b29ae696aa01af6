"""Fixtures shared by the model_store tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store import LocalStore, MemoryStore, StoreBase


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBase:
    """Each backend, so one contract suite covers both."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return MemoryStore()
