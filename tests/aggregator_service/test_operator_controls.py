"""What an operator (the dashboard, the run commands) calls: pause, stop, delete, live progress, why
an experiment waits, example configs and device states.

The coordinator runs without a worker: the tests speak for the worker with
signed events, and a fake clock drives deadlines and repeats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from aggregator_service import Database, RoundService
from aggregator_service.api.app import create_app
from broker import (
    CheckIn,
    Delivery,
    MemoryTransport,
    Message,
    PartialReady,
    RoundAbandoned,
    RoundProgress,
    decode,
)
from model_store import LocalStore
from tests.clocks import Clock
from tests.identities import TOPICS, device, round_service, sign

ADMIN = {"Authorization": "Bearer ops-admin"}
VIEWER = {"Authorization": "Bearer ops-viewer"}


@dataclass
class Bench:
    transport: MemoryTransport
    clock: Clock
    db: Database
    store: LocalStore
    service: RoundService
    client: FlaskClient
    control: list[Message] = field(default_factory=list)

    def check_in(self, *names: str) -> None:
        for name in names:
            public_key = device(name).public_key_text
            self.service.register_device("python", public_key=public_key, device_id=name)
            self.transport.publish(
                TOPICS.checkin(name), sign(CheckIn(device_id=name, platform="python"))
            )
        self.transport.join(timeout=10)

    def event(self, message: Message) -> None:
        self.transport.publish(TOPICS.events(message.experiment_id), sign(message))  # type: ignore[attr-defined]
        self.transport.join(timeout=10)

    def later(self, seconds: float) -> None:
        self.clock.now += seconds
        self.service.tick()
        self.transport.join(timeout=10)

    def kinds(self) -> list[str]:
        return [type(m).__name__ for m in self.control]

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        response = self.client.get(f"/api/v1/experiments/{experiment_id}", headers=VIEWER)
        assert response.status_code == 200, response.json
        return dict(response.json)  # type: ignore[arg-type]

    def rounds(self, experiment_id: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/api/v1/experiments/{experiment_id}/rounds", headers=VIEWER)
        assert response.status_code == 200, response.json
        return list(response.json["rounds"])  # type: ignore[index]

    def post(self, experiment_id: str, action: str, body: Any = None) -> Any:
        path = f"/api/v1/experiments/{experiment_id}/{action}"
        return self.client.post(path, json=body, headers=ADMIN)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    transport, clock = MemoryTransport(), Clock()
    db = Database("sqlite://")
    store = LocalStore(tmp_path / "store")
    service = round_service(transport, store, db, clock=clock)
    service.start()
    app = create_app(
        {"TESTING": True, "ADMIN_TOKEN": "ops-admin", "VIEWER_TOKEN": "ops-viewer"},
        service=service,
    )
    with app.test_client() as client:
        bench = Bench(transport, clock, db, store, service, client)

        def record(delivery: Delivery) -> None:
            bench.control.append(decode(delivery.body))
            delivery.ack()

        transport.subscribe(TOPICS.all_control, record)
        transport.subscribe(TOPICS.all_combine, record)
        yield bench
    transport.close()
    db.close()


@pytest.fixture
def experiment_id(bench: Bench, small_config: Any) -> str:
    # 4 devices per round, 1.3 over-selection: 6 selected, target 4, minimum 3.
    return bench.service.create_experiment(small_config(rounds={"deadline_s": 30.0}))


def _progress(experiment_id: str, *devices: str) -> RoundProgress:
    return RoundProgress(
        experiment_id=experiment_id, round=1, reported=devices, accepted=devices[1:]
    )


def test_an_experiment_says_how_many_devices_it_waits_for(bench: Bench, experiment_id: str) -> None:
    bench.check_in("d0", "d1")

    bench.post(experiment_id, "rounds", {"count": 1})
    waiting = bench.experiment(experiment_id)

    assert waiting["state"] == "waiting"
    assert waiting["waiting"] == {"online": 2, "needed": 3, "grace_until": None}
    bench.check_in("d2")
    running = bench.experiment(experiment_id)
    assert running["state"] == "running" and running["waiting"] is None


def test_the_round_in_flight_shows_its_phase_and_counts_until_it_ends(
    bench: Bench, experiment_id: str
) -> None:
    bench.check_in(*(f"d{i}" for i in range(6)))
    bench.post(experiment_id, "rounds", {"count": 1})

    bench.event(_progress(experiment_id, "d0", "d1", "d2"))
    bench.later(10.0)
    training = bench.rounds(experiment_id)[0]
    bench.later(25.0)  # past the 30 s deadline
    closing = bench.rounds(experiment_id)[0]
    bench.event(RoundAbandoned(experiment_id=experiment_id, round=1, reason="too few"))

    assert training["state"] == "training"
    progress = training["progress"]
    assert progress["phase"] == "training"
    assert (progress["reported"], progress["accepted"]) == (3, 2)
    assert (progress["target"], progress["minimum"]) == (4, 3)
    assert progress["deadline_at"] == training["deadline_at"]
    assert progress["remaining_s"] == pytest.approx(20.0)
    assert closing["progress"]["phase"] == "closing"
    assert closing["progress"]["remaining_s"] == 0.0
    ended = bench.rounds(experiment_id)[0]
    assert ended["state"] == "abandoned" and "progress" not in ended


def test_stop_abandons_the_round_in_flight_and_its_late_outcome_is_ignored(
    bench: Bench, experiment_id: str
) -> None:
    bench.check_in(*(f"d{i}" for i in range(6)))
    bench.post(experiment_id, "rounds", {"count": 3})
    bench.event(_progress(experiment_id, "d0", "d1"))

    response = bench.post(experiment_id, "stop")
    bench.transport.join(timeout=10)

    assert response.status_code == 202
    assert response.json["state"] == "idle"
    assert response.json["rounds_requested"] == response.json["current_round"] == 1
    (stopped,) = bench.rounds(experiment_id)
    assert stopped["state"] == "abandoned"
    assert stopped["reason"] == "stopped by the operator"
    assert (stopped["reported"], stopped["dropped"]) == (2, stopped["selected"] - 2)
    assert stopped["ended_at"] is not None
    # The workers hear it closed once and are never asked to combine it.
    assert bench.kinds() == ["RoundOpened", "CloseRound"]
    bench.later(60.0)
    bench.event(RoundAbandoned(experiment_id=experiment_id, round=1, reason="late"))
    assert bench.kinds() == ["RoundOpened", "CloseRound"]
    assert bench.rounds(experiment_id)[0]["reason"] == "stopped by the operator"
    assert bench.experiment(experiment_id)["state"] == "idle"


def test_stop_cannot_recall_a_combine_already_requested(bench: Bench, experiment_id: str) -> None:
    bench.check_in(*(f"d{i}" for i in range(6)))
    bench.post(experiment_id, "rounds", {"count": 3})
    target = tuple(f"d{i}" for i in range(4))
    bench.event(
        RoundProgress(experiment_id=experiment_id, round=1, reported=target, accepted=target)
    )
    bench.event(PartialReady(experiment_id=experiment_id, round=1, sequence=0))
    assert bench.kinds()[-1] == "CombineRound"

    response = bench.post(experiment_id, "stop")
    in_flight = bench.rounds(experiment_id)[0]
    bench.event(RoundAbandoned(experiment_id=experiment_id, round=1, reason="combined"))

    # Its version may be being written: the round ends with the outcome the combiner reports.
    assert response.status_code == 202
    assert in_flight["state"] == "training" and in_flight["progress"]["phase"] == "combining"
    (ended,) = bench.rounds(experiment_id)
    assert (ended["state"], ended["reason"]) == ("abandoned", "combined")
    assert bench.experiment(experiment_id)["state"] == "idle"


def test_pause_lets_the_round_in_flight_finish_and_starts_no_more(
    bench: Bench, experiment_id: str
) -> None:
    bench.check_in(*(f"d{i}" for i in range(6)))
    bench.post(experiment_id, "rounds", {"count": 3})

    response = bench.post(experiment_id, "pause")
    bench.event(RoundAbandoned(experiment_id=experiment_id, round=1, reason="too few"))

    assert response.status_code == 202
    assert response.json["state"] == "running" and response.json["rounds_requested"] == 1
    assert [r["round"] for r in bench.rounds(experiment_id)] == [1]
    assert bench.experiment(experiment_id)["state"] == "idle"
    bench.post(experiment_id, "rounds", {"count": 1})  # resumed by asking for more
    assert [r["round"] for r in bench.rounds(experiment_id)] == [1, 2]


def test_pausing_or_stopping_a_waiting_experiment_ends_the_wait(
    bench: Bench, small_config: Any
) -> None:
    ids = [bench.service.create_experiment(small_config()) for _ in range(2)]
    bench.check_in("d0")
    for experiment_id in ids:
        bench.post(experiment_id, "rounds", {"count": 2})

    paused = bench.post(ids[0], "pause").json
    stopped = bench.post(ids[1], "stop").json
    bench.check_in("d1", "d2", "d3")

    for shown in (paused, stopped):
        assert shown["state"] == "idle" and shown["waiting"] is None
        assert shown["rounds_requested"] == 0
    assert all(bench.rounds(i) == [] for i in ids)  # no round started when devices came


def test_delete_is_refused_while_a_round_is_in_flight(bench: Bench, experiment_id: str) -> None:
    bench.check_in(*(f"d{i}" for i in range(6)))
    bench.post(experiment_id, "rounds", {"count": 1})
    path = f"/api/v1/experiments/{experiment_id}"

    refused = bench.client.delete(path, headers=ADMIN)
    bench.post(experiment_id, "stop")
    deleted = bench.client.delete(path, headers=ADMIN)

    assert refused.status_code == 409 and refused.json["error"]["code"] == "conflict"
    assert deleted.status_code == 204 and deleted.data == b""
    assert bench.client.get(path, headers=VIEWER).status_code == 404
    assert bench.db.rounds(experiment_id) == []
    assert bench.store.get_manifest(experiment_id, 0)  # the model versions stay
    assert bench.client.delete(path, headers=ADMIN).status_code == 404


@pytest.mark.parametrize("headers", [{}, VIEWER])
def test_the_controls_need_the_admin_token(
    bench: Bench, experiment_id: str, headers: dict[str, str]
) -> None:
    path = f"/api/v1/experiments/{experiment_id}"

    for response in (
        bench.client.post(f"{path}/pause", headers=headers),
        bench.client.post(f"{path}/stop", headers=headers),
        bench.client.delete(path, headers=headers),
    ):
        assert response.status_code == 401
    assert bench.experiment(experiment_id)["state"] == "idle"


def test_the_controls_of_an_unknown_experiment_are_404(bench: Bench) -> None:
    for response in (
        bench.post("nope", "pause"),
        bench.post("nope", "stop"),
        bench.client.delete("/api/v1/experiments/nope", headers=ADMIN),
        bench.client.delete("/api/v1/experiments/..", headers=ADMIN),
    ):
        assert response.status_code == 404
        assert response.json["error"]["code"] == "not_found"


def test_devices_are_online_offline_or_revoked(bench: Bench) -> None:
    bench.check_in("d0", "d1")
    bench.service.register_device("python", public_key=device("d2").public_key_text, device_id="d2")
    bench.service.revoke_device("d1")

    listed = bench.client.get("/api/v1/devices", headers=VIEWER).json["devices"]

    assert {d["id"]: d["state"] for d in listed} == {
        "d0": "online",
        "d1": "revoked",
        "d2": "offline",
    }


def test_example_configs_are_listed_and_served(
    tmp_path: Path, bench: Bench, small_config: Any
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "small.json").write_text(json.dumps(small_config().to_dict()))
    (folder / "toml-one.toml").write_text('name = "t"\n[model]\nzoo = "logreg"\n')
    (folder / "notes.txt").write_text("not a config")
    (folder / "broken.json").write_text("{")
    app = create_app(
        {"TESTING": True, "ADMIN_TOKEN": "a", "CONFIGS_DIR": str(folder)}, service=bench.service
    )
    auth = {"Authorization": "Bearer a"}

    with app.test_client() as client:
        listed = client.get("/api/v1/configs", headers=auth).json["configs"]
        small = client.get("/api/v1/configs/small", headers=auth)
        broken = client.get("/api/v1/configs/broken", headers=auth)
        missing = client.get("/api/v1/configs/notes", headers=auth)
        unauthorized = client.get("/api/v1/configs", headers={})

    assert [c["file"] for c in listed] == ["broken.json", "small.json", "toml-one.toml"]
    assert small.status_code == 200
    assert small.json["config"]["model"] == small_config().to_dict()["model"]
    assert broken.status_code == 400 and broken.json["error"]["code"] == "invalid_config"
    assert missing.status_code == 404
    assert unauthorized.status_code == 401


def test_the_shipped_example_configs_are_offered_by_default(bench: Bench) -> None:
    listed = bench.client.get("/api/v1/configs", headers=VIEWER).json["configs"]
    names = [c["name"] for c in listed]

    assert "digits_fedavg" in names
    for name in names:
        shown = bench.client.get(f"/api/v1/configs/{name}", headers=VIEWER)
        assert shown.status_code == 200, shown.json
