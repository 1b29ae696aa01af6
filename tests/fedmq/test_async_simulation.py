"""FedBuff in `fedmq simulate`: asynchronous steps in emulated time, deterministic."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from device_sdk.emulator.profiles import heterogeneous
from fedmq.cli import main
from fedmq.compose import simulate

FEDBUFF = {"name": "fedbuff", "buffer_size": 4, "max_staleness": 1}


def test_fedbuff_steps_do_not_wait_for_slow_devices_and_replay_identically(
    small_config: Any,
) -> None:
    config = small_config(strategy=FEDBUFF, rounds={"count": 4})
    profile = heterogeneous(config.seed, config.data.devices)  # one device at 10x

    first = simulate(config, profile=profile)
    second = simulate(config, profile=profile)

    rounds = first.rounds
    assert [(r.state, r.base_version, r.version, len(r.accepted)) for r in rounds] == [
        ("committed", n, n + 1, 4) for n in range(4)
    ]
    slow = [f"emu-{i:04d}" for i in range(6) if profile.factor(i) == 10.0]
    assert set(slow) <= set(rounds[0].selected)  # the slow device got a task in step 1...
    assert rounds[-1].ended_at is not None and rounds[-1].ended_at < 10.0  # ...4 steps ago
    # Fast devices finished several tasks meanwhile; a 3x device's late update is
    # beyond max_staleness = 1 and refused as stale.
    assert len(rounds[0].selected) > 6
    assert sum(r.rejected.get("stale", 0) for r in rounds) >= 1
    assert first.final_weights == second.final_weights
    assert [r.ended_at for r in first.rounds] == [r.ended_at for r in second.rounds]


def test_cli_simulate_takes_a_speed_profile(tmp_path: Path, small_config: Any, capsys: Any) -> None:
    config_path = tmp_path / "fedbuff.json"
    config_path.write_text(json.dumps(small_config(strategy=FEDBUFF).to_dict()))
    out = tmp_path / "out"

    status = main(["simulate", str(config_path), "--profile", "heterogeneous", "--out", str(out)])
    bad = main(["simulate", str(config_path), "--profile", "warp-speed"])

    assert status == 0
    with (out / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], r["state"], r["accepted"]) for r in rows] == [
        ("1", "committed", "4"),
        ("2", "committed", "4"),
    ]
    assert bad == 1 and "unknown speed profile 'warp-speed'" in capsys.readouterr().err
