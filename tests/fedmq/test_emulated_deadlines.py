"""Deadlines in emulated time: a device slower than a round's deadline misses the round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from device_sdk.emulator.profiles import load_profile
from fedmq.compose import simulate


def test_an_update_due_after_the_deadline_finds_its_round_closed(
    small_config: Any, tmp_path: Path
) -> None:
    config = small_config(rounds={"count": 2, "devices_per_round": 6, "min_reports": 5})
    delays = tmp_path / "slow.json"
    delays.write_text(json.dumps({"0": 1000}))  # device 0: 1,000 s a task; deadline 60 s

    result = simulate(config, profile=load_profile(str(delays)))

    rounds = result.rounds
    assert [(r.state, len(r.selected), r.reported) for r in rounds] == [("committed", 6, 5)] * 2
    assert all("emu-0000" not in r.accepted for r in rounds)
    # Each round ends at its deadline (seen within a tick), not when the slow task ends.
    assert all(r.ended_at is not None and r.ended_at - r.started_at <= 61.0 for r in rounds)
