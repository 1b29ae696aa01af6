"""The coordinator at fleet scale: 10,000 signed devices checking in, 1,000-device cohorts.

Drives one ``RoundService`` in-process through its transport handlers (a
recording transport stands in for the broker, so the figures are the
coordinator's own: signature checks, the device registry, the online pool,
selection, task dispatch and pace steering, the database) and the REST API
through Flask's test client. It reports:

- check-ins per second, for the fleet coming online and for heartbeats
  (every device re-sends a signed ``CheckIn`` every ``--heartbeat-s``; the
  service's clock moves on by that much between waves);
- database writes per check-in (statements counted by a SQLAlchemy event
  listener on every engine);
- the time to start a round (select the cohort, send its tasks and tell the
  others to come back later) and to record its outcome;
- the size of a 1,000-device round with every id (as results files hold
  it), as the API lists it (``GET /experiments/<id>/rounds``) and as it
  pages its ids (``.../rounds/<n>/devices``), and of the device table (``GET
  /devices``, all and a page of 100);
- the time the coordinator takes over a round's progress (workers report
  the devices that answered, 100 a message here);
- check-ins per second while an asynchronous (FedBuff) step is open;
- the process's resident memory (the fleet's keys are made before the
  first figure; building the experiment's model imports torch).

Run: ``python -m experiments.bench.service_scale`` (about a minute at the
defaults); ``--db postgresql`` uses the machine's PostgreSQL in a schema of
its own, ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from aggregator_service import Database, ExperimentConfig, RoundService
from aggregator_service.api.app import create_app
from aggregator_service.rounds import describe
from aggregator_service.versions import write_version
from broker import CheckIn, RoundCommitted, RoundProgress, decode_weights, encode
from broker.identity import SERVICE_NAME, Identity, KeyRing
from broker.topics import Topics
from broker.transport import Handler, ReconnectListener
from model_store import LocalStore

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRITES = ("INSERT", "UPDATE", "DELETE")


@dataclass
class _Delivery:
    """A frame handed to a handler, as a broker would."""

    topic: str
    body: bytes
    redelivered: bool = False
    settled: str | None = None

    def ack(self) -> None:
        self.settled = "ack"

    def nack(self, requeue: bool = False) -> None:
        self.settled = "requeue" if requeue else "dead"


@dataclass
class _Subscription:
    def cancel(self) -> None:
        """Nothing to stop."""


@dataclass
class RecordingTransport:
    """Keeps the coordinator's handlers for the bench to call; counts what it publishes."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    published: Counter[str] = field(default_factory=Counter)
    published_bytes: int = 0

    def publish(self, topic: str, body: bytes) -> None:
        kind = topic.split("/")[1] if "/" in topic else topic
        self.published[kind] += 1
        self.published_bytes += len(body)

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> _Subscription:
        self.handlers[topic] = handler
        return _Subscription()

    def on_reconnect(self, listener: ReconnectListener) -> None:
        """No connection to lose."""

    def close(self) -> None:
        """Nothing to close."""

    def deliver(self, pattern: str, topic: str, body: bytes) -> None:
        delivery = _Delivery(topic, body)
        self.handlers[pattern](delivery)
        assert delivery.settled == "ack", f"{topic}: {delivery.settled}"


@dataclass
class Statements:
    """Counts the SQL statements every engine runs, writes by verb."""

    writes: int = 0
    reads: int = 0
    rows_written: int = 0

    def __call__(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, many: bool
    ) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in WRITES:
            self.writes += 1
            self.rows_written += len(parameters) if many else 1
        elif verb == "SELECT":
            self.reads += 1

    def snapshot(self) -> tuple[int, int, int]:
        return self.writes, self.reads, self.rows_written


def rss_mib() -> float:
    """Return this process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Clock:
    """The coordinator's clock: wall time plus however far the bench moved it on."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@contextlib.contextmanager
def database(kind: str, folder: Path) -> Iterator[Database]:
    """Open a fresh database: a SQLite file, or a PostgreSQL schema of its own."""
    if kind == "sqlite":
        db = Database(f"sqlite:///{folder / 'fedmq.db'}")
        yield db
        db.close()
        return
    schema = f"fedmq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    db = Database(f"{PG}?options=-csearch_path%3D{schema}")
    try:
        yield db
    finally:
        db.close()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


class Bench:
    """One coordinator, its fleet of identities, and the figures measured on them."""

    def __init__(self, args: argparse.Namespace, db: Database, folder: Path) -> None:
        self.args = args
        self.db = db
        self.clock = Clock()
        self.topics = Topics()
        self.transport = RecordingTransport()
        self.worker = Identity.generate("bench-worker")
        self.store = LocalStore(folder / "store")
        self.service = RoundService(
            self.transport,
            self.store,
            db,
            identity=Identity.generate(SERVICE_NAME),
            worker_keys=KeyRing({self.worker.name: self.worker.public_key}),
            clock=self.clock,
        )
        self.service.start()
        self.statements = Statements()
        event.listen(Engine, "before_cursor_execute", self.statements)
        self.devices = [Identity.generate(f"dev-{i:05d}") for i in range(args.devices)]
        self.busy: frozenset[str] = frozenset()
        self.app = create_app({"TESTING": True, "ADMIN_TOKEN": TOKEN}, service=self.service)
        self.results: dict[str, Any] = {"devices": args.devices, "cohort": args.cohort}

    def close(self) -> None:
        event.remove(Engine, "before_cursor_execute", self.statements)
        close = getattr(self.service, "close", None)
        if close is not None:
            close()

    def register(self) -> None:
        started = time.perf_counter()
        for identity in self.devices:
            self.service.register_device(
                "emulated", public_key=identity.public_key_text, device_id=identity.name
            )
        elapsed = time.perf_counter() - started
        self.results["register_per_s"] = round(len(self.devices) / elapsed)

    def frames(self) -> list[tuple[str, bytes]]:
        """Return each device's check-in, freshly signed (a device signs its own)."""
        frames = []
        for identity in self.devices:
            capabilities: dict[str, int] = {CheckIn.EXAMPLES: 100}
            if identity.name in self.busy:
                capabilities[CheckIn.TASKS_IN_PROGRESS] = 1
            message = CheckIn(
                device_id=identity.name, platform="emulated", capabilities=capabilities
            )
            frames.append((self.topics.checkin(identity.name), encode(message, identity)))
        return frames

    def wave(self, name: str) -> None:
        """Every device checks in once; record the rate and the statements it cost."""
        frames = self.frames()
        before = self.statements.snapshot()
        started = time.perf_counter()
        for topic, body in frames:
            self.transport.deliver(self.topics.all_checkins, topic, body)
        elapsed = time.perf_counter() - started
        tick_started = time.perf_counter()
        self.service.tick()  # what the service's ticker does four times a second
        tick_s = time.perf_counter() - tick_started
        writes, reads, rows = (
            a - b for a, b in zip(self.statements.snapshot(), before, strict=True)
        )
        self.results.setdefault("waves", []).append(
            {
                "wave": name,
                "check_ins_per_s": round(len(frames) / elapsed),
                "us_per_check_in": round(elapsed / len(frames) * 1e6, 1),
                "db_writes_per_check_in": round(writes / len(frames), 4),
                "db_rows_written": rows,
                "db_reads_per_check_in": round(reads / len(frames), 4),
                "tick_after_wave_ms": round(tick_s * 1e3, 1),
            }
        )

    def heartbeats(self, label: str) -> None:
        for number in range(self.args.heartbeats):
            self.clock.offset += self.args.heartbeat_s
            self.wave(f"{label} heartbeat {number + 1}")

    def experiment(self, strategy: Mapping[str, Any]) -> str:
        config = ExperimentConfig.from_dict(
            {
                "name": f"scale-{strategy['name']}",
                "seed": 1,
                "model": {"zoo": "mlp", "input_shape": [784], "num_classes": 10, "hidden": [16]},
                "data": {"dataset": "mnist", "devices": self.args.devices},
                "strategy": dict(strategy),
                "rounds": {
                    "count": 1,
                    "devices_per_round": self.args.cohort,
                    "over_selection": 1.0,
                    "min_reports": self.args.cohort // 2,
                    "deadline_s": 600.0,
                },
                "training": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.1},
            }
        )
        return self.service.create_experiment(config)

    def rounds(self) -> None:
        """Run cohort rounds: select and dispatch, then record a worker's commit of each."""
        experiment_id = self.experiment({"name": "fedavg"})
        starts, outcomes, progress = [], [], []
        for number in range(1, self.args.rounds + 1):
            self.transport.published.clear()
            before = self.statements.snapshot()
            started = time.perf_counter()
            self.service.request_rounds(experiment_id, 1)
            starts.append(time.perf_counter() - started)
            writes = self.statements.snapshot()[0] - before[0]
            published = dict(self.transport.published)
            record = self.service.rounds(experiment_id)[-1]
            assert record.number == number and len(record.selected) == self.args.cohort
            progress.append(self.progress(experiment_id, number, record.selected))
            commit = self.commit(experiment_id, number, record.selected)
            started = time.perf_counter()
            self.transport.deliver(
                self.topics.all_events, self.topics.events(experiment_id), commit
            )
            outcomes.append(time.perf_counter() - started)
            assert self.service.rounds(experiment_id)[-1].state == "committed"
        self.results["round_start_ms"] = round(float(np.median(starts)) * 1e3, 1)
        self.results["round_start_db_writes"] = writes
        self.results["round_start_published"] = published
        self.results["round_outcome_ms"] = round(float(np.median(outcomes)) * 1e3, 1)
        self.results["round_progress_ms"] = round(float(np.median(progress)) * 1e3, 1)
        self.serve(experiment_id)

    def progress(self, experiment_id: str, number: int, selected: tuple[str, ...]) -> float:
        """Return the time the coordinator takes over a round's progress, 100 devices a message."""
        frames = [
            encode(
                RoundProgress(
                    experiment_id=experiment_id,
                    round=number,
                    reported=selected[i : i + 100],
                    accepted=selected[i : i + 100],
                ),
                self.worker,
            )
            for i in range(0, len(selected), 100)
        ]
        started = time.perf_counter()
        for frame in frames:
            self.transport.deliver(self.topics.all_events, self.topics.events(experiment_id), frame)
        return time.perf_counter() - started

    def commit(self, experiment_id: str, number: int, selected: tuple[str, ...]) -> bytes:
        """Return a worker's signed commit of the round: every selected device accepted."""
        manifest = self.store.get_manifest(experiment_id, number - 1)
        base = decode_weights(self.store.get_blob(manifest.artifacts["weights.safetensors"].sha256))
        ref = write_version(self.store, experiment_id, number - 1, number, base, {})
        message = RoundCommitted(
            experiment_id=experiment_id,
            round=number,
            version=number,
            model=ref,
            reported=len(selected),
            accepted=tuple(uuid.uuid4().hex for _ in selected),
            accepted_devices=tuple(sorted(selected)),
        )
        return encode(message, self.worker)

    def serve(self, experiment_id: str) -> None:
        """Measure the API's answers about a run of 1,000-device rounds and 10,000 devices."""
        record = self.service.rounds(experiment_id)[-1]
        # A round with every id, as results files write it.
        self.results["round_record_full_json_bytes"] = len(json.dumps(describe(record)))
        with self.app.test_client() as client:
            for name, path in (
                ("rounds", f"/api/v1/experiments/{experiment_id}/rounds"),
                ("round_devices", f"/api/v1/experiments/{experiment_id}/rounds/1/devices"),
                ("devices", "/api/v1/devices"),
                ("devices_page", "/api/v1/devices?limit=100"),
            ):
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    response = client.get(path, headers=AUTH)
                    times.append(time.perf_counter() - started)
                self.results[f"get_{name}_bytes"] = len(response.data)
                self.results[f"get_{name}_ms"] = round(float(np.median(times)) * 1e3, 1)
                self.results[f"get_{name}_status"] = response.status_code
        self.results["get_rounds_bytes_per_round"] = (
            self.results["get_rounds_bytes"] // self.args.rounds
        )

    def asynchronous(self) -> None:
        """Open a FedBuff step over the whole fleet, then measure heartbeats with it open."""
        experiment_id = self.experiment({"name": "fedbuff", "buffer_size": 100})
        started = time.perf_counter()
        self.service.request_rounds(experiment_id, 1)
        self.results["fedbuff_step_open_ms"] = round((time.perf_counter() - started) * 1e3, 1)
        self.busy = frozenset(self.service.rounds(experiment_id)[-1].selected)
        self.heartbeats("fedbuff")


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, database(args.db, Path(tmp)) as db:
        bench = Bench(args, db, Path(tmp))
        try:
            bench.results["db"] = args.db
            bench.results["rss_mib_start"] = round(rss_mib(), 1)
            bench.register()
            bench.wave("coming online")
            bench.heartbeats("idle")
            bench.results["rss_mib_after_waves"] = round(rss_mib(), 1)
            bench.rounds()
            bench.results["rss_mib_after_rounds"] = round(rss_mib(), 1)
            if args.fedbuff:
                bench.asynchronous()
            bench.results["rss_mib_end"] = round(rss_mib(), 1)
        finally:
            bench.close()
        return bench.results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--cohort", type=int, default=1_000)
    parser.add_argument("--heartbeats", type=int, default=2, help="heartbeat waves per phase")
    parser.add_argument("--heartbeat-s", type=float, default=30.0, help="the fleet's interval")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--no-fedbuff", dest="fedbuff", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = run(args)
    text_out = json.dumps(results, indent=2)
    print(text_out)
    if args.json:
        args.json.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
