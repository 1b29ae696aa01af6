"""Shared fixtures: small configs and an in-process stack."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aggregator_service import Database, ExperimentConfig, RoundService
from aggregator_service.evaluation import held_out_evaluator
from broker import MemoryTransport
from model_store import LocalStore
from tests.identities import BUILT_WORKERS, aggregator, round_service

SMALL_CONFIG: dict[str, Any] = {
    "name": "small",
    "seed": 3,
    "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [16]},
    "data": {"dataset": "digits", "devices": 6, "partition": "dirichlet", "alpha": 0.5},
    "strategy": {"name": "fedavg"},
    "rounds": {"count": 2, "devices_per_round": 4, "min_reports": 3, "deadline_s": 60.0},
    "training": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.1},
}


@pytest.fixture(autouse=True)
def _stop_built_workers() -> Iterator[None]:
    """Stop every worker a test built, so none beats on into later tests."""
    yield
    while BUILT_WORKERS:
        BUILT_WORKERS.pop().stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the long tests first, so that `make test`'s two workers finish together.

    Long: every end-to-end test (10-60 s, real processes) and those marked
    ``long``. With ``--maxschedchunk 1`` pytest-xdist hands each worker the
    next tests two at a time as it gets free, so the long ones split between
    the workers and the short ones fill in behind; run last, one long test
    would leave the other worker idle for a minute.
    """
    items.sort(key=lambda item: 0 if _is_long(item) else 1)  # stable: the rest keep their order


def _is_long(item: pytest.Item) -> bool:
    return item.get_closest_marker("long") is not None or item.nodeid.startswith("tests/e2e/")


def _small_config(**sections: Any) -> ExperimentConfig:
    """Return SMALL_CONFIG with some sections' fields replaced."""
    raw = copy.deepcopy(SMALL_CONFIG)
    for key, value in sections.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return ExperimentConfig.from_dict(raw)


@pytest.fixture
def small_config() -> Any:
    """Return a factory of small, fast experiment configs (override sections by keyword)."""
    return _small_config


@dataclass
class Stack:
    """Service and worker wired on an in-process bus."""

    transport: MemoryTransport
    store: LocalStore
    db: Database
    service: RoundService


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    transport = MemoryTransport()
    store = LocalStore(tmp_path / "store")
    db = Database("sqlite://")
    service = round_service(transport, store, db, evaluator_factory=held_out_evaluator)
    service.start()
    aggregator(transport, store).start()
    yield Stack(transport, store, db, service)
    transport.close()
    db.close()
