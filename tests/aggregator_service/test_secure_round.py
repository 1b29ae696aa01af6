"""The secure aggregation protocol end to end, without a bus: devices and the round's state.

Real device participants (``device_sdk.secagg``) and the coordinator's state
machine (``aggregator_service.secagg.state``) exchange encoded, signed frames
by hand, so each stage, each dropout and each refusal is checked in
isolation. ``test_secure_aggregation.py`` runs the same protocol through the
service, the workers and the fleet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest

from aggregator_service.config import SecureAggregationConfig
from aggregator_service.secagg.graph import degree_for, neighbourhoods, threshold_for
from aggregator_service.secagg.state import Abandon, SecureRound, Stage
from aggregator_service.secagg.strategy import MASKED, MaskedSum, SecureSum
from aggregator_service.strategies import FedAvg
from broker import ModelRef, TrainTask, decode
from broker.messages import SecAggSettings
from broker.secagg import SecAggError, quantize, scale_for
from broker.secagg.messages import SecAggUnmask
from device_sdk.secagg import SecureParticipant, Vanish
from tests.identities import TOPICS, device

MAX_EXAMPLES = 1000
BASE = {"dense.weight": np.zeros((6, 5), np.float32), "dense.bias": np.zeros(5, np.float32)}


@dataclass
class Protocol:
    """One secure round driven by hand: ``n`` devices, some of which vanish."""

    n: int
    vanish: Mapping[str, Vanish] = field(default_factory=dict)
    neighbours: int = 0
    threshold: float = 0.6
    frames: list[bytes] = field(default_factory=list)
    sent: dict[str, tuple[dict[str, np.ndarray], int]] = field(default_factory=dict)
    deltas: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = [f"dev-{i:02d}" for i in range(self.n)]
        self.settings = SecAggSettings(
            clip=1.0, scale=scale_for(1.0, MAX_EXAMPLES * self.n), max_examples=MAX_EXAMPLES
        )
        self.devices = {d: self._participant(d) for d in self.ids}
        self.round = SecureRound(
            "exp",
            1,
            frozenset(self.ids),
            seed=11,
            settings=SecureAggregationConfig(neighbours=self.neighbours, threshold=self.threshold),
            min_reports=3,
            scale=self.settings.scale,
        )
        self.tasks = {
            d: TrainTask(
                experiment_id="exp",
                round=1,
                base_version=0,
                model=ModelRef("exp/v0", "0" * 64, 1, "safetensors"),
                secure_aggregation=self.settings,
            )
            for d in self.ids
        }

    def _participant(self, device_id: str) -> SecureParticipant:
        def send_update(
            task: TrainTask, weights: dict[str, np.ndarray], n: int, _metrics: object
        ) -> None:
            self.sent[device_id] = (weights, n)

        def publish(_topic: str, frame: bytes) -> None:
            self.frames.append(frame)

        vanish = self.vanish.get(device_id)
        return SecureParticipant(device(device_id), publish, TOPICS, send_update, vanish=vanish)

    def drain(self) -> list[object]:
        """Return the messages the devices sent since the last call (decoded)."""
        messages = [decode(f) for f in self.frames]
        self.frames.clear()
        return messages

    def keys(self) -> None:
        for d in self.ids:
            self.devices[d].task(self.tasks[d])
        for message in self.drain():
            self.round.add_keys(message)  # type: ignore[arg-type]

    def shares(self) -> None:
        for d, message in self.round.fix_u1().items():
            self.devices[d].neighbours(message)
        for message in self.drain():
            self.round.add_shares(message)  # type: ignore[arg-type]

    def upload(self) -> None:
        rng = np.random.default_rng(5)
        for d, message in self.round.fix_u2().items():
            self.devices[d].delivery(message)
            if not self.devices[d].may_train():
                continue
            delta = {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in BASE.items()}
            self.deltas[d] = delta
            trained = {k: BASE[k] + delta[k] for k in BASE}
            examples = int(rng.integers(50, 2 * MAX_EXAMPLES))  # some above the cap
            self.devices[d].trained(self.tasks[d], BASE, trained, examples, {})

    def unmask(self) -> MaskedSum:
        total = MaskedSum(BASE)
        for weights, n in self.sent.values():
            total.add(weights, n)
        for d, message in self.round.fix_u3(tuple(self.sent)).items():
            self.devices[d].unmask(message)
        for message in self.drain():
            self.round.add_reveal(message)  # type: ignore[arg-type]
        return total

    def run(self) -> tuple[dict[str, np.ndarray], float]:
        """Run every stage; return the unmasked sum of weighted deltas and the total weight."""
        self.keys()
        self.shares()
        self.upload()
        total = self.unmask()
        unmasking = self.round.unmasking()
        assert unmasking is not None, self.round.missing()
        secure = SecureSum(FedAvg(), clip=1.0, max_examples=MAX_EXAMPLES)
        plain = secure.unmask(BASE, total, unmasking)
        return dict(plain.sums), plain.total_weight

    def expected(self) -> dict[str, np.ndarray]:
        """Return the example-weighted sum of the clipped deltas of the devices in the sum."""
        out = {k: np.zeros(v.shape) for k, v in BASE.items()}
        for d in self.sent:
            _weights, n = self.sent[d]
            for k in out:
                out[k] += n * np.clip(self.deltas[d][k].astype(np.float64), -1, 1)
        return out

    def bound(self) -> float:
        """Return the largest rounding error of the sum: half a step per summed device."""
        return len(self.sent) * 0.5 / self.settings.scale + 1e-9


def assert_exact_sum(protocol: Protocol) -> None:
    sums, total_weight = protocol.run()
    expected = protocol.expected()
    assert total_weight == sum(n for _w, n in protocol.sent.values())
    for k in BASE:  # the base is zero, so the sum of models is the sum of deltas
        assert np.abs(sums[k] - expected[k]).max() <= protocol.bound()
    assert all(n <= MAX_EXAMPLES for _w, n in protocol.sent.values())


def test_the_unmasked_sum_equals_the_plain_weighted_sum_within_the_rounding() -> None:
    protocol = Protocol(8)
    assert_exact_sum(protocol)
    assert len(protocol.sent) == 8
    assert not protocol.round.unmasking().pairs  # type: ignore[union-attr]


@pytest.mark.parametrize("stage", list(Vanish), ids=lambda v: v.value)
@pytest.mark.parametrize("share", [0.1, 0.3])
def test_devices_vanishing_at_any_stage_leave_the_sum_of_the_rest(
    stage: Vanish, share: float
) -> None:
    n = 20
    gone = {f"dev-{i:02d}": stage for i in range(0, n, 3)[: round(share * n)]}
    protocol = Protocol(n, gone)
    assert_exact_sum(protocol)
    summed = set(protocol.sent)
    if stage is Vanish.UNMASK:  # they uploaded; their masks come off with the others' shares
        assert summed == set(protocol.ids)
    else:
        assert summed == set(protocol.ids) - set(gone)
    if stage is Vanish.UPLOAD:  # their pairwise masks stay in the sum until rebuilt
        assert protocol.round.unmasking().pairs  # type: ignore[union-attr]


def test_a_sparse_neighbourhood_still_unmasks_exactly() -> None:
    protocol = Protocol(30, {"dev-03": Vanish.UPLOAD, "dev-17": Vanish.UPLOAD}, neighbours=4)
    assert_exact_sum(protocol)
    assert all(len(peers) >= 4 for peers in protocol.round.graph.values())
    assert max(len(peers) for peers in protocol.round.graph.values()) < 29


def test_too_few_devices_sharing_abandons_the_round_with_the_reason() -> None:
    protocol = Protocol(6, {f"dev-0{i}": Vanish.SHARES for i in range(3)})
    protocol.keys()
    protocol.shares()
    with pytest.raises(Abandon, match="3 device\\(s\\) sent shares, 4 needed"):
        protocol.round.fix_u2()


def test_too_few_reveals_leave_the_sum_masked() -> None:
    protocol = Protocol(6, {f"dev-0{i}": Vanish.UNMASK for i in range(3)})
    protocol.keys()
    protocol.shares()
    protocol.upload()
    protocol.unmask()
    assert protocol.round.stage is Stage.UNMASKING
    assert protocol.round.unmasking() is None
    assert protocol.round.missing() == "3 of 6 device(s) revealed shares"


def test_too_few_keys_abandon_at_the_first_stage() -> None:
    protocol = Protocol(4, {"dev-00": Vanish.KEYS, "dev-01": Vanish.KEYS})
    protocol.keys()
    with pytest.raises(Abandon, match="2 device\\(s\\) advertised keys"):
        protocol.round.fix_u1()


def test_what_leaves_a_device_is_masked() -> None:
    protocol = Protocol(5)
    protocol.keys()
    protocol.shares()
    protocol.upload()
    for d, (weights, n) in protocol.sent.items():
        flat = np.concatenate([weights[k].ravel() for k in sorted(weights)])
        plain, _ = quantize(
            np.concatenate([protocol.deltas[d][k].ravel() for k in sorted(BASE)]).astype(
                np.float64
            ),
            clip=1.0,
            weight=n,
            scale=protocol.settings.scale,
        )
        assert flat.dtype == MASKED
        assert np.count_nonzero(flat == plain) <= 1  # chance agreement of uniform words only


def test_a_device_never_reveals_both_shares_of_one_neighbour() -> None:
    protocol = Protocol(5)
    protocol.keys()
    protocol.shares()
    protocol.upload()
    requests = protocol.round.fix_u3(tuple(protocol.sent))
    me = "dev-00"
    asked = requests[me]
    other = asked.survivors[-1]
    both = SecAggUnmask(experiment_id="exp", round=1, survivors=(other,), dropped=(other,))
    with pytest.raises(SecAggError, match="both shares"):
        protocol.devices[me].unmask(both)
    protocol.devices[me].unmask(asked)
    # Asked again, now with the neighbour dropped: that is its other share, refused.
    flipped = SecAggUnmask(
        experiment_id="exp",
        round=1,
        survivors=tuple(v for v in asked.survivors if v != other),
        dropped=(other,),
    )
    with pytest.raises(SecAggError, match="different unmask request"):
        protocol.devices[me].unmask(flipped)
    (reveal,) = protocol.drain()
    assert set(reveal.seed_shares) == set(asked.survivors)  # type: ignore[attr-defined]
    assert not reveal.key_shares  # type: ignore[attr-defined]


def test_a_device_refuses_a_neighbourhood_without_its_own_keys() -> None:
    protocol = Protocol(6, neighbours=2)
    protocol.keys()
    messages = protocol.round.fix_u1()
    # dev-00's neighbourhood handed to a device outside it.
    outsider = next(d for d in protocol.ids if d not in messages["dev-00"].peers)
    with pytest.raises(SecAggError, match="does not hold the keys"):
        protocol.devices[outsider].neighbours(messages["dev-00"])


def test_the_coordinator_refuses_reveals_it_did_not_ask_for() -> None:
    protocol = Protocol(4)
    protocol.keys()
    protocol.shares()
    protocol.upload()
    protocol.round.fix_u3(tuple(protocol.sent))
    protocol.devices["dev-00"].unmask(
        SecAggUnmask(experiment_id="exp", round=1, survivors=(), dropped=("dev-01",))
    )
    (reveal,) = protocol.drain()
    with pytest.raises(SecAggError, match="not asked for"):
        protocol.round.add_reveal(reveal)  # type: ignore[arg-type]


def test_neighbourhoods_are_symmetric_regular_and_fixed_by_the_seed() -> None:
    devices = [f"d{i}" for i in range(50)]
    graph = neighbourhoods(devices, 10, [3, 1])
    assert graph == neighbourhoods(list(reversed(devices)), 10, [3, 1])
    assert graph != neighbourhoods(devices, 10, [3, 2])
    for d, peers in graph.items():
        assert d not in peers
        assert len(peers) == 10
        assert all(d in graph[p] for p in peers)
    assert neighbourhoods(devices[:5], 10, [0]) == {
        d: tuple(x for x in devices[:5] if x != d) for d in devices[:5]
    }


def test_the_threshold_is_a_strict_majority_of_each_neighbourhood() -> None:
    # A coordinator lying about who dropped could otherwise collect both
    # shares of one device from two disjoint halves of its neighbourhood.
    for degree in range(2, 40):
        t = threshold_for(degree, 0.51)
        assert 2 * t > degree + 1
        assert t <= degree + 1


@pytest.mark.parametrize("n", [200, 1000])
def test_the_chosen_degree_survives_the_dropout_it_was_chosen_for(n: int) -> None:
    dropout, fraction = 0.3, 0.55
    degree = degree_for(n, dropout, fraction)
    assert degree < n - 1 if n == 1000 else degree <= n - 1
    assert degree_for(20, dropout, fraction) == 19  # small cohorts: every other device
    devices = [f"d{i}" for i in range(n)]
    graph = neighbourhoods(devices, degree, [9])
    t = threshold_for(degree, fraction)
    rng = np.random.default_rng(2)
    for _ in range(20):  # independent dropouts at the rate it was chosen for
        stayed = {d for d in devices if rng.random() >= dropout}
        assert all(len(stayed & {d, *peers}) >= t for d, peers in graph.items())
    # And a much sparser graph would not: the degree is not padding.
    sparse = neighbourhoods(devices, 20, [9])
    t20 = threshold_for(20, fraction)
    stayed = {d for d in devices if rng.random() >= dropout}
    assert any(len(stayed & {d, *peers}) < t20 for d, peers in sparse.items())


def test_a_device_refuses_a_threshold_below_a_majority_of_its_neighbourhood() -> None:
    protocol = Protocol(6)
    protocol.keys()
    message = protocol.round.fix_u1()["dev-00"]
    assert len(message.peers) == 6
    for threshold in (1, 2, 3):  # 3 of 6 is not a strict majority
        lowered = dataclasses.replace(message, threshold=threshold)
        with pytest.raises(SecAggError, match="not a majority"):
            protocol.devices["dev-00"].neighbours(lowered)
    assert not protocol.drain()
    protocol.devices["dev-00"].neighbours(dataclasses.replace(message, threshold=4))
    assert len(protocol.drain()) == 1


def test_a_reveal_with_a_malformed_share_is_refused_before_it_is_kept() -> None:
    protocol = Protocol(4)
    protocol.keys()
    protocol.shares()
    protocol.upload()
    requests = protocol.round.fix_u3(tuple(protocol.sent))
    protocol.devices["dev-00"].unmask(requests["dev-00"])
    (reveal,) = protocol.drain()
    bad = dataclasses.replace(
        reveal,  # type: ignore[type-var]
        seed_shares={v: "AAAA" for v in reveal.seed_shares},  # type: ignore[attr-defined]
    )
    with pytest.raises(SecAggError):
        protocol.round.add_reveal(bad)
    assert "dev-00" not in protocol.round.reveals
    assert protocol.round.add_reveal(reveal)  # type: ignore[arg-type]


def test_a_neighbour_whose_share_does_not_open_is_skipped_not_the_whole_reveal() -> None:
    protocol = Protocol(5)
    protocol.keys()
    protocol.shares()
    deliveries = protocol.round.fix_u2()
    me = "dev-00"
    spoiled = dict(deliveries[me].shares)
    spoiled["dev-01"] = spoiled["dev-02"]  # dev-02's ciphertext, not for this pair
    protocol.devices[me].delivery(dataclasses.replace(deliveries[me], shares=spoiled))
    asked = SecAggUnmask(
        experiment_id="exp", round=1, survivors=("dev-01", "dev-02", "dev-03"), dropped=()
    )
    protocol.devices[me].unmask(asked)
    (reveal,) = protocol.drain()
    assert set(reveal.seed_shares) == {"dev-02", "dev-03"}  # type: ignore[attr-defined]


def test_wrong_seeds_leave_the_sum_out_of_its_bound_and_are_refused() -> None:
    protocol = Protocol(5)
    protocol.keys()
    protocol.shares()
    protocol.upload()
    total = protocol.unmask()
    unmasking = protocol.round.unmasking()
    assert unmasking is not None
    one = next(iter(unmasking.seeds))
    wrong = dataclasses.replace(unmasking, seeds={**unmasking.seeds, one: bytes(32)})
    secure = SecureSum(FedAvg(), clip=1.0, max_examples=MAX_EXAMPLES)
    with pytest.raises(ValueError, match="exceeds its bound"):
        secure.unmask(BASE, total, wrong)


def test_a_device_keeps_each_experiments_rounds_apart() -> None:
    protocol = Protocol(3)
    participant = protocol.devices["dev-00"]
    for experiment, number in (("a", 50), ("a", 51), ("b", 3)):
        task = dataclasses.replace(protocol.tasks["dev-00"], experiment_id=experiment, round=number)
        participant.task(task)
    assert participant.holds("a", 50) and participant.holds("a", 51) and participant.holds("b", 3)
    participant.task(dataclasses.replace(protocol.tasks["dev-00"], experiment_id="a", round=52))
    assert not participant.holds("a", 50)
    assert participant.holds("b", 3)


def test_a_sum_whose_neighbourhoods_cannot_reach_the_threshold_abandons_at_once() -> None:
    # 12 devices, 4 neighbours, threshold 3 of 5: three adjacent devices on the
    # ring missing from the sum leave the one between them 2 holders.
    protocol = Protocol(12, neighbours=4)
    protocol.keys()
    protocol.shares()
    protocol.upload()
    graph = protocol.round.graph
    owner = protocol.ids[0]
    gone = set(graph[owner][:3])
    summed = tuple(d for d in protocol.sent if d not in gone)
    holders = len(set(summed) & {owner, *graph[owner]})
    assert holders < protocol.round.threshold
    with pytest.raises(Abandon, match=f"has {holders} device\\(s\\) in the sum, 3 needed"):
        protocol.round.fix_u3(summed)
