"""`simulate` under a device trace: bit-reproducible, and the trace decides who reports."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator_service import ExperimentConfig
from device_sdk.emulator.profiles import TraceProfile, load_profile
from fedmq.compose import RunResult, simulate

ROOT = Path(__file__).parents[2]
SHORT = ROOT / "tests" / "fixtures" / "traces" / "short_trace.json"


def _config() -> ExperimentConfig:
    """Return the smallest digits config: 20 devices, all selected, 60 s deadline."""
    raw = json.loads((ROOT / "experiments" / "configs" / "digits_fedavg.json").read_text())
    raw["rounds"]["min_reports"] = 4  # a round commits with the devices the trace lets report
    return ExperimentConfig.from_dict(raw)


def test_simulate_replays_a_trace_bit_for_bit_and_the_trace_decides_who_reports() -> None:
    config = _config()
    profile = load_profile(str(SHORT), seed=config.seed, devices=config.data.devices)
    assert isinstance(profile, TraceProfile)

    first = simulate(config, rounds=2, profile=profile)
    second = simulate(config, rounds=2, profile=load_profile(str(SHORT)))

    def outcome(result: RunResult) -> list[tuple[object, ...]]:
        return [
            (r.state, r.selected, r.accepted_devices, dict(r.metrics), r.started_at, r.ended_at)
            for r in result.rounds
        ]

    assert first.final_weights == second.final_weights
    assert outcome(first) == outcome(second)
    assert first.fleet == second.fleet
    # Device i plays entry i mod 4: fast, too-slow (past the deadline), leaves
    # mid-task (at 3 s, back at 100 s), joins at 50 s. Only devices online when
    # a round starts are selected: round 1 (at 0 s) finds the late joiners away,
    # round 2 (after 60 s) those that left mid-task.
    entry = {f"emu-{i:04d}": i % 4 for i in range(20)}
    one, two = first.rounds
    assert {entry[d] for d in one.selected} == {0, 1, 2} and len(one.selected) == 15
    assert {entry[d] for d in two.selected} == {0, 1, 3} and len(two.selected) == 15
    assert {entry[d] for d in one.accepted_devices} == {0}
    assert {entry[d] for d in two.accepted_devices} == {0, 3}
    assert len(one.accepted_devices) == 5 and len(two.accepted_devices) == 10
    # the rounds end at the 60 s deadline, seen within the 5 s step of emulated time
    assert 60.0 <= one.ended_at - one.started_at < 65.0  # type: ignore[operator]
    assert one.state == two.state == "committed"
    # the slow devices' round-1 updates came after the round closed; the
    # devices that went offline never answered at all
    assert first.fleet["updates_sent"] < first.fleet["tasks"] == 30
    assert first.fleet["failures"] == 0
