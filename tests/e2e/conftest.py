"""End-to-end tests that kill, restart or time processes take turns.

``make test`` runs the suite on two pytest-xdist workers with ``--dist
loadgroup``. The tests that kill, restart or time processes (crashes, broker
restarts, a cluster, readiness, a thousand devices, a trace, hostile traffic,
access control) join one ``e2e`` group, so one worker runs them in turn: two
of them never run at once, though the other worker's tests run beside them.
The modules below, which only check what a deployment computes, go to either.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent

RUN_BESIDE = frozenset(
    {
        "test_dashboard.py",
        "test_demo.py",
        "test_large_model.py",
        "test_mixed_fleet.py",
        "test_production_shape.py",
        "test_regions.py",
        "test_run_commands.py",
    }
)
"""Modules whose waits hold with another deployment running at the same time."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the e2e tests not in ``RUN_BESIDE`` into the one ``e2e`` xdist group."""
    for item in items:
        path = Path(item.path)
        if _HERE in path.parents and path.name not in RUN_BESIDE:
            item.add_marker(pytest.mark.xdist_group("e2e"))
