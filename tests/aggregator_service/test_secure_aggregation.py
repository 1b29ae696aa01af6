"""Secure aggregation through the whole in-process deployment: service, workers, fleet.

The committed models equal the plain run's within the quantisation error;
the workers receive and store only masked integers; devices that vanish at
any stage leave the sum of the others, or abandon the round with a reason
when too few remain. ``test_secure_round.py`` checks the protocol's stages
one by one; the end-to-end fault tests run it over a real broker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aggregator_service.worker as worker_module
import device_sdk.secagg as device_secagg
from aggregator_service.errors import ConfigError
from aggregator_service.secagg.strategy import MASKED
from broker import decode_weights
from device_sdk.secagg import Vanish
from fedmq.compose import RunResult, simulate
from tests.conftest import _small_config

RELATIVE = 1e-4
"""The stated bound: secure and plain models differ by at most this fraction of the change."""

FAST = {"stage_timeout_s": 1.5}
"""Stage timeouts for tests: a device that vanished is given up on quickly."""


def _change(result: RunResult) -> dict[str, np.ndarray]:
    first, last = decode_weights(result.initial_weights), decode_weights(result.final_weights)
    return {k: last[k].astype(np.float64) - first[k] for k in last}


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
@pytest.mark.parametrize("workers", [1, 2])
def test_the_secure_model_equals_the_plain_one_within_the_quantisation_error(
    strategy: str, workers: int
) -> None:
    sections: dict[str, Any] = {
        "rounds": {"count": 2, "over_selection": 1.0},
        "strategy": {"name": strategy},
    }
    plain = simulate(_small_config(**sections))
    secure = simulate(_small_config(secure_aggregation={}, **sections), workers=workers)
    assert [r.state for r in secure.rounds] == ["committed", "committed"]
    assert [r.reported for r in secure.rounds] == [r.reported for r in plain.rounds]
    want, got = _change(plain), _change(secure)
    for name in want:
        scale = np.abs(want[name]).max()
        assert scale > 1e-3  # the model moved: the comparison means something
        assert np.abs(got[name] - want[name]).max() <= RELATIVE * scale, name


@dataclass
class Spy:
    """What the devices computed in the clear, and what the workers were handed."""

    quantised: list[np.ndarray] = field(default_factory=list)
    received: list[dict[str, np.ndarray]] = field(default_factory=list)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    seen = Spy()
    quantize = device_secagg.quantize
    decode = worker_module.decode_update_weights

    def quantise_and_keep(values: np.ndarray, **kwargs: Any) -> tuple[np.ndarray, int]:
        out, clipped = quantize(values, **kwargs)
        seen.quantised.append(out.copy())  # before the masks are added in place
        return out, clipped

    def decode_and_keep(data: Any, spec: Any) -> dict[str, np.ndarray]:
        weights = decode(data, spec)
        seen.received.append({k: v.copy() for k, v in weights.items()})
        return weights

    monkeypatch.setattr(device_secagg, "quantize", quantise_and_keep)
    monkeypatch.setattr(worker_module, "decode_update_weights", decode_and_keep)
    yield seen


def test_workers_receive_and_store_only_masked_integers(spy: Spy, tmp_path: Path) -> None:
    result = simulate(
        _small_config(rounds={"count": 1, "over_selection": 1.0}, secure_aggregation={}),
        workdir=tmp_path,
    )
    assert result.rounds[0].state == "committed"
    assert len(spy.quantised) == len(spy.received) == 4
    for weights in spy.received:
        assert {v.dtype for v in weights.values()} == {MASKED}
        flat = np.concatenate([weights[k].ravel() for k in sorted(weights)])
        for clear in spy.quantised:  # masked words agree with clear ones only by chance
            assert np.count_nonzero(flat == clear) < flat.size // 1000 + 2
    # Nothing the store or the worker's checkpoints hold carries a device's clear words.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for clear in spy.quantised:
            assert clear[:16].tobytes() not in data, path


@dataclass
class Dropouts:
    """One secure round of 10 devices in which some vanish; the deltas that were summed."""

    result: RunResult
    deltas: dict[str, tuple[dict[str, np.ndarray], int]]


def _run_with_dropouts(
    monkeypatch: pytest.MonkeyPatch, vanish: Mapping[int, Vanish], **secure: Any
) -> Dropouts:
    deltas: dict[str, tuple[dict[str, np.ndarray], int]] = {}
    trained: Callable[..., None] = device_secagg.SecureParticipant.trained

    def keep(
        self: device_secagg.SecureParticipant,
        task: Any,
        base: Any,
        weights: Any,
        num_examples: int,
        metrics: Any,
    ) -> None:
        clipped = {
            k: np.clip(np.subtract(weights[k], base[k], dtype=np.float64), -1, 1) for k in base
        }
        deltas[self._me] = (clipped, num_examples)
        trained(self, task, base, weights, num_examples, metrics)

    monkeypatch.setattr(device_secagg.SecureParticipant, "trained", keep)
    config = _small_config(
        data={"devices": 10},
        rounds={
            "count": 1,
            "devices_per_round": 10,
            "over_selection": 1.0,
            "min_reports": 3,
            "deadline_s": 4.0,
        },
        secure_aggregation={**FAST, **secure},
    )
    return Dropouts(simulate(config, vanish=vanish), deltas)


def _fedavg_of(
    deltas: Mapping[str, tuple[dict[str, np.ndarray], int]],
    devices: set[str],
    base: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    total = sum(deltas[d][1] for d in devices)
    return {k: base[k] + sum(deltas[d][0][k] * deltas[d][1] for d in devices) / total for k in base}


@pytest.mark.parametrize(
    ("stage", "gone"),
    [
        (Vanish.KEYS, (0, 4, 7)),
        (Vanish.SHARES, (1, 5, 8)),
        (Vanish.UPLOAD, (2,)),
        (Vanish.UPLOAD, (2, 6, 9)),
        (Vanish.UNMASK, (3,)),
        (Vanish.UNMASK, (0, 3, 6)),
    ],
    ids=lambda v: v.value if isinstance(v, Vanish) else f"{len(v) * 10}%",
)
def test_a_round_commits_the_sum_of_the_devices_that_stayed(
    monkeypatch: pytest.MonkeyPatch, stage: Vanish, gone: tuple[int, ...]
) -> None:
    run = _run_with_dropouts(monkeypatch, {i: stage for i in gone})
    (record,) = run.result.rounds
    assert record.state == "committed", record.reason
    lost = {f"emu-{i:04d}" for i in gone}
    summed = set(run.deltas) if stage is Vanish.UNMASK else set(run.deltas) - lost
    assert not summed & lost or stage is Vanish.UNMASK
    assert set(record.accepted_devices) == summed
    base = decode_weights(run.result.initial_weights)
    want = _fedavg_of(run.deltas, summed, base)
    got = decode_weights(run.result.final_weights)
    for k in want:
        assert np.abs(got[k] - want[k]).max() <= 1e-5, k


def test_too_few_devices_sharing_keys_abandons_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_with_dropouts(monkeypatch, {i: Vanish.SHARES for i in range(5)})
    (record,) = run.result.rounds
    assert record.state == "abandoned"
    assert record.reason == "secure aggregation: 5 device(s) sent shares, 6 needed"


def test_too_few_reveals_abandon_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_with_dropouts(monkeypatch, {i: Vanish.UNMASK for i in range(5)})
    (record,) = run.result.rounds
    assert record.state == "abandoned"
    assert record.reason is not None
    assert "too few shares to unmask; 5 of 10 device(s) revealed shares" in record.reason


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"strategy": {"name": "krum"}}, "strategy krum needs every update in the clear"),
        ({"strategy": {"name": "scaffold"}}, "strategy scaffold needs each device's control"),
        ({"strategy": {"name": "fedbuff"}}, "strategy fedbuff has no cohort"),
        (
            {"rounds": {"devices_per_round": 2, "min_reports": 2, "over_selection": 1.0}},
            "a cohort of at least 3",
        ),
        ({"secure_aggregation": {"threshold": 0.5}}, "threshold: above 0.5"),
        ({"secure_aggregation": {"dropout": 0.45}}, "dropout: at least 0 and below 1 - threshold"),
        ({"secure_aggregation": {"clip": 1e30}}, "leaves no precision in 32-bit sums"),
    ],
)
def test_settings_it_cannot_serve_are_refused_with_the_reason(
    sections: dict[str, Any], problem: str
) -> None:
    secure = sections.pop("secure_aggregation", {})
    with pytest.raises(ConfigError, match=re.escape(problem)):
        _small_config(secure_aggregation=secure, **sections)


def test_many_small_devices_keep_the_precision_of_the_plain_run(spy: Spy) -> None:
    # 60 devices of ~25 examples: a scale fixed by max_examples (10,000) for
    # every device would round most of each weighted delta away; the round's
    # scale follows the examples its devices declared instead.
    sections: dict[str, Any] = {
        "data": {"devices": 60},
        "rounds": {"count": 1, "devices_per_round": 60, "over_selection": 1.0, "min_reports": 60},
    }
    plain = simulate(_small_config(**sections))
    secure = simulate(_small_config(secure_aggregation={}, **sections))
    assert secure.rounds[0].state == "committed"
    want, got = _change(plain), _change(secure)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= RELATIVE * np.abs(want[name]).max(), name
    largest = max(int(np.abs(q.view(np.int32)).max()) for q in spy.quantised)
    assert largest > 2**20  # the words use the 32 bits, not a sliver of them
