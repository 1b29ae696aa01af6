"""The trace study's quick mode runs, writes its three files, and is deterministic for a seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.studies import trace_sync_async
from experiments.studies._results import RESULTS, comparable

RUN_KEYS = {
    "method",
    "seed",
    "start_h",
    "curve",
    "reach",
    "stopped_at",
    "steps",
    "abandoned",
    "updates",
    "tasks",
    "refused",
    "devices_folded",
    "fleet_tasks",
    "unanswered",
    "online_at_start",
    "real_s",
}


def _quick(out: Path) -> list[dict[str, Any]]:
    assert trace_sync_async.main(["--quick", "--out", str(out)]) == 0
    runs: list[dict[str, Any]] = json.loads((out / "trace_sync_async.json").read_text())
    return runs


def test_quick_mode_writes_a_table_runs_and_a_plot_and_repeats_bit_for_bit(
    tmp_path: Path,
) -> None:
    first = _quick(tmp_path / "a")
    second = _quick(tmp_path / "b")

    assert [(r["method"], r["seed"], r["start_h"]) for r in first] == [
        (method, 0, 0) for method in trace_sync_async.METHODS
    ]
    for r in first:
        assert set(r) == RUN_KEYS
        assert set(r["reach"]) == {str(t) for t in trace_sync_async.TARGETS}
        assert r["curve"], "every quick run commits a model"
        times = [t for t, _ in r["curve"]]
        assert times == sorted(times) and 0 < times[-1] <= r["stopped_at"]
        assert all(0.0 <= accuracy <= 1.0 for _, accuracy in r["curve"])
        assert r["updates"] <= r["tasks"] and r["unanswered"] <= r["fleet_tasks"]
    table = (tmp_path / "a" / "trace_sync_async.md").read_text()
    assert table.startswith("# ") and "Command: `python -m experiments.studies" in table
    assert "--quick" in table and table.count("| 00:00 |") == 2 * len(trace_sync_async.METHODS)
    assert (tmp_path / "a" / "trace_sync_async.png").stat().st_size > 0
    # The same seed gives the same runs on the virtual clock: only wall times differ.
    for r in first + second:
        r.pop("real_s")
    assert first == second
    assert comparable(table) == comparable((tmp_path / "b" / "trace_sync_async.md").read_text())


def test_a_rotated_trace_starts_its_day_later() -> None:
    trace = trace_sync_async.fleet_trace(40, seed=5, start_h=0)
    noon = trace_sync_async.fleet_trace(40, seed=5, start_h=12)

    for at in (0.0, 3 * 3600.0, 11.5 * 3600.0, 23 * 3600.0):
        for i in range(40):
            at_noon = noon.device(i).availability.online_at(at)
            assert at_noon == trace.device(i).availability.online_at((at + 12 * 3600.0) % 86400)
    assert [d.compute_ms_per_example for d in noon.devices] == [
        d.compute_ms_per_example for d in trace.devices
    ]


def test_the_committed_table_is_what_the_committed_runs_render_to() -> None:
    """The table, its numbers and the JSON beside it agree (rerunning the study takes minutes)."""
    runs = json.loads((RESULTS / "trace_sync_async.json").read_text())
    committed = (RESULTS / "trace_sync_async.md").read_text()

    assert committed.splitlines()[2].startswith(f"Command: `{trace_sync_async.COMMAND}`")
    table = trace_sync_async.render(runs, trace_sync_async.FULL, trace_sync_async.COMMAND)
    assert comparable(table) == comparable(committed)
    assert {r["seed"] for r in runs} == set(trace_sync_async.SEEDS)
    assert (RESULTS / "trace_sync_async.png").stat().st_size > 0
