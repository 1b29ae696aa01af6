"""Fixtures shared by the model_store tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store import LocalStore, MemoryStore, StoreBase
from tests.s3_server import MotoS3
from tests.s3_server import s3_server as running_s3_server


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBase:
    """Each backend, so one contract suite covers all three."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    if request.param == "s3":
        s3: MotoS3 = request.getfixturevalue("s3_server")
        return s3.store()
    return MemoryStore()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    """moto's S3 server on 127.0.0.1 (free port) behind a SigV4 gate, with one bucket."""
    with running_s3_server() as s3:
        yield s3
